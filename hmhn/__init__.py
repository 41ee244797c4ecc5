"""HMHN depression-recognition model: blocks, losses, video-level metrics, backbone loading."""
from hmhn.blocks.attention_fusion import AttentionFusion
from hmhn.checkpoint import load_backbone_checkpoint
from hmhn.config import BDI_MAX, BDI_MIN, HMHNConfig
from hmhn.blocks.cross_attention import CrossAttentionHead, MultiHeadCrossAttention
from hmhn.blocks.feature_fusion import DeepFeatureFusion
from hmhn.blocks.grid_attention import GridWiseAttention
from hmhn.losses import LossConfig, hmhn_loss, partition_loss
from hmhn.metrics import video_metrics, video_scores
from hmhn.model import HMHN, HMHNOutput, HMHNScorer, export_scorer
from hmhn.blocks.resnet import ResNet18, ResNet18Trunk

__all__ = [
    "BDI_MAX", "BDI_MIN", "HMHN", "HMHNConfig", "HMHNOutput", "HMHNScorer", "LossConfig", "AttentionFusion",
    "CrossAttentionHead", "DeepFeatureFusion", "GridWiseAttention", "MultiHeadCrossAttention", "ResNet18",
    "ResNet18Trunk", "export_scorer", "hmhn_loss", "load_backbone_checkpoint", "partition_loss",
    "video_metrics", "video_scores",
]
