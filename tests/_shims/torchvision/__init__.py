"""TEST-ONLY stand-in for torchvision, which cannot be installed beside the CPU torch build.

It exists only so that ``import pytorch_grad_cam`` succeeds: that package imports torchvision at import
time for utilities we never call (image pre-processing transforms, SESS resizing, box IoU for detection
targets). The GradCAM computation never touches any of it. tests/core/test_cam.py puts this folder on
``sys.path`` inside a fixture only; product code must never import it.
"""

__version__ = "0.0.0+pdl1-test-shim"
