"""Training and evaluation of segmentation nets on VOC-layout data (shaped like torchvision's references/segmentation)."""
