"""The HMHN network's building blocks, one module each (docs/MODEL.md): the ResNet-18 trunk, grid-wise
attention (GWA), deep feature fusion (DFF), multi-head cross attention (MAB) and attention fusion
(AFB). hmhn/model.py assembles them."""
