"""Every key the trainer (`dmljax.train.train_and_evaluate`) reads, with its default.

This is the one place defaults live: the trainer reads ``config.<section>.<key>`` without
fallbacks, dataset configs (`omniglot`, `cub200_resnet50`, ...) start from ``get_config()`` and
change what their protocol needs. ``*.options`` nodes are free-form keyword options of a
library function (``loss.options`` -> the loss of ``loss.name``, ``method.options`` ->
`dmljax.methods.plugin.make_method`, ``sampler.options`` -> the sampler); their defaults are
those functions' keyword defaults. The trainer flags are described in `dmljax.train.cli`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.workdir = "runs/default"

    c.data = ml_collections.ConfigDict()
    c.data.name = "omniglot"  # omniglot, toy, tfds:<name>, sop, inshop, folder (dmljax.data.sources)
    c.data.train_split = "background"
    c.data.test_split = "evaluation"
    c.data.image_size = 28  # stored side in pixels
    c.data.crop_size = 0  # training crop / test centre crop of RGB sources (0 = image_size)
    c.data.rotation_classes = 1  # Omniglot: k rotations of every character as new classes
    c.data.resize = "stretch"  # or "center_crop" (TFDS / folder sources)
    c.data.crop_to_bbox = False
    c.data.data_dir = ""  # TFDS data directory ("" = TFDS default)
    c.data.download = False
    c.data.cache_dir = ""  # keep decoded TFDS arrays as .npz here ("" = decode every run)
    c.data.root = ""  # sop / inshop / folder sources
    c.data.eval_ks = ()  # () = the source's protocol (Omniglot / CUB: 1, 2, 4, 8; SOP: 1, 10, 100, 1000)
    c.data.num_workers = 8  # image decoding threads of folder sources
    c.data.label_noise = 0.0  # fraction of training labels corrupted (dmljax.methods.label_noise)
    c.data.label_noise_kind = "symmetric"  # or "pairflip"

    c.model = ml_collections.ConfigDict()
    c.model.backbone = "convnet"  # convnet, global_local, resnet18/34/50/101, bn_inception
    c.model.channels = (32, 64, 128, 256)  # convnet
    c.model.num_pools = 3
    c.model.pooling = "avg"  # or "flatten"
    c.model.pool_padding = "VALID"  # "SAME": keep an odd last row / column when pooling
    c.model.stem = "conv"  # or "space_to_depth"
    c.model.embedding_dim = 128
    c.model.head_norm = ""  # "", "batch" or "layer"
    c.model.in_channels = 0  # 0 = the data source's channels
    c.model.dtype = "float32"  # or "bfloat16" (parameters stay float32)
    c.model.pretrained_path = ""  # torchvision / Caffe-converted state dict (.pth / .npz)
    c.model.width = 0  # ResNet stage width (0 = 64)
    c.model.layers = ()  # ResNet blocks per stage (() = the standard depth)
    c.model.small_input = False
    c.model.global_local = ml_collections.ConfigDict()  # model.backbone="global_local"
    c.model.global_local.local_dim = 64
    c.model.global_local.local_embedding_dim = 0  # 0 = model.embedding_dim
    c.model.global_local.local_weight = 1.0

    c.loss = ml_collections.ConfigDict()
    c.loss.name = "multi_similarity"  # dmljax.train.available_losses() or "ensemble"
    c.loss.options = ml_collections.ConfigDict()  # keyword options of the loss (its defaults otherwise)
    c.loss.components = ()  # loss.name="ensemble": loss names or {"name": ..., "options": {...}}
    # Matryoshka representation learning (dmljax.losses.matryoshka): the loss on each prefix
    # z[:, :m] of the embedding, e.g. (256, 128, 64, 32); None = off
    c.loss.matryoshka_dims = None
    c.loss.matryoshka_weights = None  # one weight per prefix (None = 1 each, the paper)
    c.loss.matryoshka_normalize = True  # L2-normalise every prefix before the loss

    c.sampler = ml_collections.ConfigDict()
    c.sampler.name = "m_per_class"  # or "hierarchical", "lifted_hard_negative"
    c.sampler.classes_per_batch = 16
    c.sampler.samples_per_class = 8
    c.sampler.options = ml_collections.ConfigDict()

    c.augment = ml_collections.ConfigDict()
    c.augment.enabled = True
    c.augment.preset = ""  # "" = affine for convnet backbones, imagenet otherwise
    c.augment.rotation = 10.0  # affine preset
    c.augment.shear = 10.0
    c.augment.translation = 0.1
    c.augment.zoom = (0.9, 1.1)
    c.augment.elastic_alpha = 0.0  # grey-scale data: elastic distortion (Simard et al. 2003); 0 = off
    c.augment.elastic_sigma = 4.0
    c.augment.crop_scale = (0.08, 1.0)  # imagenet preset: torchvision RandomResizedCrop default
    c.augment.flip = True

    c.optim = ml_collections.ConfigDict()
    c.optim.optimizer = "adamw"
    c.optim.learning_rate = 3e-3
    c.optim.warmup_steps = 100
    c.optim.num_steps = 1500
    c.optim.backbone_lr_mult = 1.0
    c.optim.head_lr_mult = 1.0
    c.optim.loss_lr_mult = 10.0  # learnable loss arrays (proxies) learn faster
    c.optim.weight_decay = 1e-4
    c.optim.freeze_batch_norm = False

    c.method = ml_collections.ConfigDict()
    c.method.name = "none"  # daml, hard_sample_generation, iaa, das, divide_conquer, alternating_projection, bspml
    c.method.options = ml_collections.ConfigDict()
    c.memory = ml_collections.ConfigDict()
    c.memory.size = 0  # > 0: cross-batch memory (XBM) of that many embeddings for a pair loss
    c.memory.start_step = 0  # plain batch loss before this step
    c.distill = ml_collections.ConfigDict()
    c.distill.teacher = ""  # workdir of a trained run: RKD from its frozen model
    c.distill.weight = 1.0
    c.distill.distance_weight = 1.0  # Park et al. 2019, Sec. 4.1
    c.distill.angle_weight = 2.0

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 1024  # embedding chunk of the evaluation
    c.eval.tta_shifts = ((0, 0),)  # test-time views (dmljax.train.tta)
    c.eval.tta_zooms = (1.0,)
    c.eval.final_tta_shifts = ()  # views of the last evaluation (() = tta_shifts)
    c.eval.feature_weight = 0.0
    c.eval.precise_bn_batches = 0  # > 0: PreciseBN statistics of that many clean training batches
    c.eval.precise_bn_batch_size = 256
    c.eval.rerank = ""  # "similarity": similarity-network re-ranking (dmljax.train.rerank)
    c.eval.rerank_k = 10
    c.eval.rerank_steps = 1000
    c.eval.rerank_margin = 0.5
    c.eval.rerank_hidden = (512, 512)
    c.eval.rerank_neighbours = 20
    c.eval.rerank_batch_size = 512
    c.eval.rerank_learning_rate = 1e-3

    c.train = ml_collections.ConfigDict()
    c.train.ema_decay = 0.0  # > 0: evaluate an exponential moving average of the weights
    c.train.data_parallel = False  # shard_map over all local devices
    # gradient caching (dmljax.train.grad_cache): embed the batch in chunks of this many items
    # per device, activations of one chunk in memory at a time; None = off
    c.train.embed_chunk_size = None
    c.train.embed_chunk_unroll = False  # unroll the loops over chunks (faster on XLA:CPU, no memory bound)
    c.train.eval_every = 500
    c.train.checkpoint_every = 1000
    c.train.log_every = 10
    c.train.final_nmi = True
    c.train.progress = True
    return c
