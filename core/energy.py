"""Energy per inference: an estimate from a documented model, never a measurement.

    energy = MACs x energy per MAC  +  bits sent and received x energy per bit

The constants are per class of device and link, from published measurements (README, "Energy"):

- compute, from Horowitz, "Computing's energy problem (and what we can do about it)", ISSCC 2014
  (45 nm): a 32-bit instruction on a CPU core costs about 70 pJ, of which the arithmetic is under
  4 pJ; an fp32 multiply 3.7 pJ and add 0.9 pJ; an int8 multiply 0.2 pJ and add 0.03 pJ.
- links, from Aalborg University's energy measurements on mobile devices (download of 500 KB;
  mobiledevices.kom.aau.dk): Wi-Fi 802.11b/g 6.45e-7 J/bit near 2.1 Mbit/s, Bluetooth 2.0+EDR
  5.72e-7 J/bit near 685 kbit/s. Receiving is counted at the same cost as sending.

Both constants can be set directly (``evaluate.energy.pj_per_mac``, ``nj_per_bit``) for a device or
link measured by the user.
"""
from __future__ import annotations

from dataclasses import dataclass

COMPUTE_CLASSES: dict[str, tuple[float, str]] = {  # name -> (pJ per MAC, what it stands for)
    "cpu_core": (70.0, "a CPU core running one MAC per instruction (Raspberry-Pi- or Cortex-M-class), 45 nm"),
    "fp32_arith": (4.6, "fp32 multiply-add alone, the floor an fp32 accelerator approaches, 45 nm"),
    "int8_arith": (0.23, "int8 multiply-add alone, the floor an int8 accelerator approaches, 45 nm"),
}
LINK_CLASSES: dict[str, tuple[float, str]] = {  # name -> (nJ per bit, what it stands for)
    "wifi": (645.0, "Wi-Fi 802.11b/g on a mobile device, about 2 Mbit/s"),
    "bluetooth": (572.0, "Bluetooth 2.0+EDR on a mobile device, about 685 kbit/s"),
}


@dataclass(frozen=True)
class EnergyModel:
    compute: str
    link: str
    pj_per_mac: float
    nj_per_bit: float

    @classmethod
    def from_config(cls, cfg: dict) -> EnergyModel:
        """From ``evaluate.energy``: class names, and optional constants that replace the classes' own."""
        compute, link = cfg["compute"], cfg["link"]
        if compute not in COMPUTE_CLASSES:
            raise ValueError(f"evaluate.energy.compute = {compute!r}; choose one of {', '.join(COMPUTE_CLASSES)}")
        if link not in LINK_CLASSES:
            raise ValueError(f"evaluate.energy.link = {link!r}; choose one of {', '.join(LINK_CLASSES)}")
        pj, nj = cfg.get("pj_per_mac"), cfg.get("nj_per_bit")
        for key, value in (("pj_per_mac", pj), ("nj_per_bit", nj)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise ValueError(f"evaluate.energy.{key} = {value!r}: must be a number above 0 (or null: the class's)")
        return cls(compute, link, float(pj if pj is not None else COMPUTE_CLASSES[compute][0]),
                   float(nj if nj is not None else LINK_CLASSES[link][0]))

    def joules(self, macs: float, bytes_moved: float) -> float:
        """Estimated energy (J) of ``macs`` multiply-accumulates and ``bytes_moved`` bytes sent or received."""
        return macs * self.pj_per_mac * 1e-12 + bytes_moved * 8 * self.nj_per_bit * 1e-9

    def describe(self) -> dict:
        return {"estimate": True, "compute": self.compute, "link": self.link, "pj_per_mac": self.pj_per_mac,
                "nj_per_bit": self.nj_per_bit}
