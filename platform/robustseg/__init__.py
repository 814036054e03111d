"""robustseg: robust medical image segmentation from small data."""
__version__ = "0.1.0"
