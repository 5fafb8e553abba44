"""A2B-GAN anomaly detection for medical images, trained on clusters."""
__version__ = "0.1.0"
