"""The data: built-in sets and image folders, transforms, splits and evaluation batches."""
