"""Peak inference memory of an ONNX model: what a device needs in RAM to run it once, read from the graph.

The estimate has three parts:

- ``weights``: every initializer and Constant, in the dtype the file stores (int8 in an int8-weight model);
- ``activations``: the largest set of activation tensors alive at once, walking the nodes in their
  stored (topological) order. A tensor lives from the node that makes it (the input: from the start)
  to the last node that reads it (an output: to the end). Batch 1, the graph's own dtypes, so a
  device's output counts in the transport dtype its graph casts to;
- ``runtime``: ONNX Runtime's own structures for the session and its nodes, and the working buffer its
  convolutions use. These constants were measured on ONNX Runtime 1.32 (x86-64) with ``measure_ort``
  over the six methods' models (``benchmarks/bench_peak_memory.py`` measures them again); another
  runtime, such as a microcontroller's, has its own.

``weights + activations`` is what any runtime needs; on a microcontroller the weights can stay in flash.

``measure_ort`` checks the estimate against ONNX Runtime: it counts the bytes that the process's
allocator holds (malloc and free, through a small preloaded C counter, ``heapcount.c``) while ONNX
Runtime loads the model and runs it at batch 1. ONNX Runtime is set up as a memory-tight device
would be: no arena, no memory-pattern planning, no weight pre-packing, one thread. Counting the
allocator, not the resident set, counts every byte held and repeats to within a few bytes;
page caching and heap reuse blur resident memory by tens of percent on models this small.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

SESSION_BYTES = 34 * 1024        # ONNX Runtime: one session's own structures
CONV_NODE_BYTES = 16 * 1024      # per Conv node (its kernel and its state)
OTHER_NODE_BYTES = 2560          # per other node
CONV_WORKSPACE_BYTES = 64 * 1024  # the working buffer of a graph that has convolutions (one thread)
COUNTER_SOURCE = Path(__file__).with_name("heapcount.c")


def _itemsize(elem_type: int) -> int:
    from onnx import helper

    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).itemsize


def peak_memory(path: str | Path) -> dict:
    """``{"weights": B, "activations": B, "runtime": B, "total": B}`` for the model at ``path`` (batch 1)."""
    import onnx
    from onnx import shape_inference

    try:
        model = shape_inference.infer_shapes(onnx.load(str(path)), data_prop=True)
    except Exception as e:  # noqa: BLE001 - onnx raises many types; any means "not a model we can read"
        raise ValueError(f"{path}: not a readable ONNX model ({type(e).__name__}: {e})") from None
    graph = model.graph
    weights = sum(int(np.prod(t.dims)) * _itemsize(t.data_type) for t in graph.initializer)
    weight_names = {t.name for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                weights += int(np.prod(value.dims)) * _itemsize(value.data_type)
                weight_names.update(node.output)

    sizes: dict[str, int] = {}
    for info in [*graph.input, *graph.value_info, *graph.output]:
        tensor = info.type.tensor_type
        dims = list(tensor.shape.dim)
        # the first axis may be the (dynamic) batch: 1; any other unknown axis leaves the tensor unsized
        if not tensor.HasField("shape") or any(not d.HasField("dim_value") for d in dims[1:]):
            continue
        sizes[info.name] = int(np.prod([d.dim_value or 1 for d in dims])) * _itemsize(tensor.elem_type)

    born: dict[str, int] = {i.name: -1 for i in graph.input if i.name not in weight_names}
    last: dict[str, int] = dict(born)
    for step, node in enumerate(graph.node):
        for name in node.input:
            if name in born:
                last[name] = step
        for name in node.output:
            if name not in weight_names:
                born[name], last[name] = step, step
    for output in graph.output:
        last[output.name] = len(graph.node)
    unsized = sorted(n for n in born if n not in sizes)
    if unsized:  # shapes computed from data (a Reshape to a computed shape): take them from one batch-1 run
        sizes |= _sizes_from_a_run(model, unsized, path)
    steps = range(-1, len(graph.node) + 1)
    activations = max(sum(sizes[n] for n in born if born[n] <= s <= last[n]) for s in steps)
    convs = sum(node.op_type == "Conv" for node in graph.node)
    runtime = (SESSION_BYTES + CONV_NODE_BYTES * convs + OTHER_NODE_BYTES * (len(graph.node) - convs)
               + (CONV_WORKSPACE_BYTES if convs else 0))
    return {"weights": weights, "activations": activations, "runtime": runtime,
            "total": weights + activations + runtime}


def allocation_counter(cache: Path | None = None) -> Path:
    """The compiled allocator counter (built once with the system C compiler, cached by its source's sha256)."""
    digest = hashlib.sha256(COUNTER_SOURCE.read_bytes()).hexdigest()[:16]
    folder = cache or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nonn"
    library = folder / f"heapcount-{digest}.so"
    if library.exists():
        return library
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        raise RuntimeError("measuring memory needs a C compiler (cc) to build the allocator counter; "
                           "install gcc (setup.sh does, as root)")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = library.with_suffix(f".{os.getpid()}.tmp")
    subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", str(tmp), str(COUNTER_SOURCE)], check=True,
                   capture_output=True)
    os.replace(tmp, library)
    return library


def _sizes_from_a_run(model, names: list[str], path: str | Path) -> dict[str, int]:
    """Bytes of ``names`` in one batch-1 run of the ONNX reference evaluator (numpy), on zeros."""
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    feeds = {}
    initializers = {t.name for t in model.graph.initializer}
    for spec in model.graph.input:
        if spec.name in initializers:
            continue
        tensor = spec.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else 1 for d in tensor.shape.dim]
        feeds[spec.name] = np.zeros(shape, helper.tensor_dtype_to_np_dtype(tensor.elem_type))
    try:
        values = ReferenceEvaluator(model).run(None, feeds, intermediate=True)
    except Exception as e:  # noqa: BLE001 - any failure means the sizes cannot be known
        raise ValueError(f"{path}: {len(names)} tensor(s) have no static shape (first: {names[0]!r}) and a "
                         f"batch-1 reference run failed ({type(e).__name__}: {e})") from None
    missing = [n for n in names if n not in values]
    if missing:
        raise ValueError(f"{path}: no size for tensor {missing[0]!r}, neither static nor from a batch-1 run")
    return {n: int(np.asarray(values[n]).nbytes) for n in names}


def measure_ort(path: str | Path, timeout_s: float = 120.0) -> dict:
    """Bytes that ONNX Runtime's allocations add to load ``path`` and run it three times at batch 1,
    counted in a fresh process: ``{"loaded": B, "peak": B, "load_peak": B}``. ``peak`` (what stays
    after loading plus the largest run) is what ``peak_memory`` estimates; ``load_peak`` also holds the
    brief second copy of the weights that ONNX Runtime keeps while it parses the file."""
    env = {**os.environ, "LD_PRELOAD": str(allocation_counter()), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "bundle.memory", str(path)], capture_output=True, text=True,
                          env=env, timeout=timeout_s, cwd=Path(__file__).resolve().parent.parent)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {path} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _measure_here(path: str) -> dict:
    import onnxruntime as ort

    counter = ctypes.CDLL(None)
    if not hasattr(counter, "heapcount_live"):
        raise RuntimeError("the allocator counter is not preloaded; call measure_ort")
    counter.heapcount_live.restype = counter.heapcount_peak.restype = ctypes.c_long

    def options() -> ort.SessionOptions:
        o = ort.SessionOptions()
        o.intra_op_num_threads = o.inter_op_num_threads = 1
        o.enable_cpu_mem_arena = False
        o.enable_mem_pattern = False
        o.add_session_config_entry("session.disable_prepacking", "1")
        o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        return o

    def feed(session: ort.InferenceSession) -> dict:
        spec = session.get_inputs()[0]
        shape = [d if isinstance(d, int) else 1 for d in spec.shape]
        dtype = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(uint8)": np.uint8}[spec.type]
        return {spec.name: np.random.default_rng(0).random(shape).astype(dtype)}

    # One session made, run and dropped first, so that ONNX Runtime's one-time set-up is not counted.
    warm = ort.InferenceSession(path, options())
    warm.run(None, feed(warm))
    del warm
    base = counter.heapcount_live()
    counter.heapcount_reset_peak()
    session = ort.InferenceSession(path, options())
    inputs = feed(session)
    loaded, load_peak = counter.heapcount_live() - base, counter.heapcount_peak() - base
    counter.heapcount_reset_peak()
    for _ in range(3):
        session.run(None, inputs)
    return {"loaded": loaded, "load_peak": load_peak, "peak": counter.heapcount_peak() - base}


def estimate_entry(path: Path, key: str) -> dict:
    """``{key: peak_memory(path)}``, or ``{key + "_error": why}`` when the graph defeats the estimate: a
    missing estimate never fails the export or the report that asks for it."""
    try:
        return {key: peak_memory(path)}
    except ValueError as e:
        return {f"{key}_error": str(e).replace(str(path.parent.parent) + "/", "")}


def staged_peak(stages: list[dict]) -> dict:
    """The peak of a device that runs several models in turn in one process (a staged bundle): every model
    stays loaded, so weights and runtime structures add up, while only one stage's activations live at a
    time."""
    weights, runtime = sum(m["weights"] for m in stages), sum(m["runtime"] for m in stages)
    activations = max(m["activations"] for m in stages)
    return {"weights": weights, "activations": activations, "runtime": runtime,
            "total": weights + activations + runtime}


if __name__ == "__main__":
    print(json.dumps(_measure_here(sys.argv[1])))
