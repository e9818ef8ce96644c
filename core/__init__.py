"""Shared, light core: imaging IO, preprocessing, the network definition, CAM code and the model manifest.

Training, export and service all import this package; it never imports them.
"""
