"""Image data: the data sets (Fashion-MNIST, CIFAR, image folders, synthetic), batch augmentation and
the in-memory Lightning data module."""
