"""CIFAR-100 on disk, in memory, in batches, augmented; and any photo a user hands in."""
