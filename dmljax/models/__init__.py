"""dmljax.models: Flax NNX backbones, embedding heads, heads owning loss parameters, similarity nets."""

from dmljax.models.bn_inception import BNInception
from dmljax.models.classifier_heads import (
    ArcFaceHead,
    CenterLossHead,
    CosFaceHead,
    LargeMarginSoftmaxHead,
    NormalizedSoftmaxHead,
    SphereFaceHead,
    SubCenterArcFaceHead,
)
from dmljax.models.convert import (
    bn_inception_torch_name,
    efficientnet_lite_torch_name,
    load_efficientnet_lite_torch,
    load_safetensors,
    load_state_dict_file,
    load_torch_state_dict,
    save_safetensors,
)
from dmljax.models.convnet import ConvNet, preprocess_images
from dmljax.models.efficientnet import (
    EfficientNetLite,
    efficientnet_lite,
    efficientnet_lite0,
    efficientnet_lite1,
    efficientnet_lite2,
    preprocess_efficientnet_lite,
)
from dmljax.models.heads import EmbeddingHead, EmbeddingModel
from dmljax.models.proxies import HIERHead, MultiProxyAnchorHead, ProxyAnchorHead, ProxyNCAHead, SoftTripleHead
from dmljax.models.resnet import ResNet, resnet18, resnet34, resnet50, resnet101
from dmljax.models.similarity import SimilarityNetwork, rerank, train_similarity_network
