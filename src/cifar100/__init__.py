"""cifar100: train, evaluate, compare and ship CIFAR-100 classifiers."""

__version__ = "0.1.0"
