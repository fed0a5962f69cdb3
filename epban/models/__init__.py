from epban.models.pban import EfficientPBAN, PBANConfig

__all__ = ["EfficientPBAN", "PBANConfig"]
