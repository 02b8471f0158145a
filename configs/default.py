"""Defaults shared by every experiment; each config file overrides a few fields.

Every field can be overridden on the command line: `--config.num_epochs=10`.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Returns the default config: CIFAR-100, a network trained alone, the authors' recipe."""
  config = ml_collections.ConfigDict()
  config.task = 'classification'       # 'classification' | 'detection' | 'suite' (train/tasks.py)

  # Data.
  config.dataset = 'cifar100'          # 'cifar100' | 'imagenet2012' | 'digits' | the path of
                                       # a folder of images (train/ and val/ of class folders)
  config.data_dir = ''                 # tfds data_dir; '' = $TFDS_DATA_DIR or ~/tensorflow_datasets
  config.batch_size = 128              # global: over all devices and hosts
  config.eval_batch_size = 512         # global; the last eval batch is padded and masked
  config.train_subset = 0              # > 0: train on the first N training examples only
  config.shuffle_buffer = 16384        # streamed datasets (ImageNet) only
  config.prefetch_batches = 2          # batches on the device ahead of the step
  # An image folder as config.dataset (data/image_folder.py, docs/custom.md):
  config.folder_augmentation = 'cifar'  # 'cifar': resized to folder_image_size, pad 1/8, random
                                       # crop, flip | 'imagenet': random-resized crop + flip
  config.folder_image_size = 32        # the network's input side
  config.folder_mean = ()              # per channel on [0, 1]; () = computed from the images
  config.folder_std = ()
  config.folder_flip = True            # random horizontal flips in training
  config.folder_eval_split = 'val'     # the eval split's subfolder

  # Networks and method.
  config.model = 'resnet20'            # the network trained: the student, or the network alone
  config.method = 'none'               # a registered method (reviewkd_jax.train.list_methods()):
                                       # 'none' trains config.model alone
  config.teacher = ''                  # the frozen teacher's model name
  config.teacher_weights = ''          # .pt/.pth state_dict, or a workdir of a run of this code
  config.teacher_checkpoint = ''       # deprecated: the former name of teacher_weights
  config.teacher_bn_mode = 'eval'      # 'eval' (running stats) | 'batch_stats' (authors' CIFAR)
  # A network of yours instead of a registered name: model/teacher = 'package.module:Class'
  # (on PYTHONPATH) and the names of its feature outputs, module paths shallow to deep
  # (docs/custom.md), e.g. ('stage1', 'stage2', 'stage3'); () for registered models.
  config.model_outputs = ()
  config.teacher_outputs = ()
  config.eval_teacher = True           # report the teacher's eval accuracy at start

  # ReviewKD: loss = ce_weight * CE + lambda * min(1, epoch / warmup) * HCL (+ kd_weight * KD).
  config.reviewkd_weight = 1.0         # lambda
  config.reviewkd_warmup_epochs = 20   # 0 = no warm-up
  config.student_features = 'stages'   # 'stages' (post-activation) | 'preact'
  config.teacher_features = 'preact'
  config.mid_channels = 0              # ABF width; 0 = min(512, deepest student channels)
  # The paper's ablations (docs/ablations.md); the defaults are the method itself.
  config.reviewkd_review = True        # teacher level j supervised by student levels i >= j;
                                       # False: by student level j only (same-level pairs)
  config.reviewkd_residual = True      # the deepest-first fused chain of ABFs; False: every
                                       # pair through its own 1x1 conv + BN + resize
  config.reviewkd_fusion = 'abf'       # the chain's fusion: 'abf' (attention) | 'sum' (plain
                                       # sum); 'none' (required) when reviewkd_residual=False
  config.reviewkd_distance = 'hcl'     # 'hcl' | 'mse' (plain MSE per level, no pyramid)
  config.reviewkd_student_stage = 0    # single pair: student stage i distilled from teacher
  config.reviewkd_teacher_stage = 0    # stage j (1-based, the pooled level last); 0, 0 = all
  config.kd_weight = 0.0               # optional logit KD term (the authors' --use-kl)
  config.kd_temperature = 4.0
  config.ce_weight = 1.0

  # Comparison methods: loss = ce_weight * CE + the method's term (+ kd_weight * KD). Defaults:
  # the CRD benchmark (RepDistiller's -b per method), OFD's and DKD's own code (mdistiller).
  config.fitnet_weight = 100.0
  config.fitnet_hint_layer = 2         # index into [stem, *stages, pooled]: stages[1]
  config.at_weight = 1000.0
  config.at_p = 2.0
  config.pkt_weight = 30000.0
  config.rkd_distance_weight = 25.0
  config.rkd_angle_weight = 50.0
  config.crd_weight = 0.8
  config.crd_feat_dim = 128
  config.crd_num_negatives = 16384     # clipped to (training examples - 1) on tiny datasets
  config.crd_temperature = 0.07
  config.crd_momentum = 0.5
  config.crd_negatives = 'other_class'  # 'other_class' (RepDistiller's mode 'exact') | 'uniform'
  config.vid_weight = 1.0
  config.vid_init_pred_var = 5.0
  config.ofd_weight = 1e-3             # 1e-4 on ImageNet in OFD's code
  config.ofd_connector_kernel = 1
  config.dkd_alpha = 1.0
  config.dkd_beta = 8.0
  config.dkd_temperature = 4.0
  config.dkd_warmup_epochs = 20        # min(1, (epoch + 1) / 20): mdistiller counts from 1

  # Optimisation: SGD, weight decay added to the gradient of every trainable parameter.
  config.num_epochs = 240
  config.learning_rate = 0.1           # for a global batch of base_batch_size
  config.base_batch_size = 128         # lr scales linearly with batch_size / base_batch_size
  config.momentum = 0.9
  config.nesterov = True
  config.weight_decay = 5e-4
  # 0-based epochs from which the lr is multiplied by lr_decay_factor. The authors' CIFAR
  # script decays after finishing epochs 150, 180, 210: epoch 151 is the first at 0.01.
  config.lr_decay_epochs = (151, 181, 211)
  config.lr_decay_factor = 0.1
  config.dtype = 'float32'             # 'bfloat16': bf16 compute, f32 params, f32 losses

  # Loop, logs and checkpoints.
  config.seed = 0                      # initialisation, data order and augmentation
  config.log_every_steps = 100
  config.eval_every_epochs = 1
  config.checkpoint_every_epochs = 1
  config.checkpoint_every_steps = 0    # extra saves within epochs; 0 = none
  config.keep_checkpoints = 3
  config.stop_after_step = 0           # stop (with a checkpoint) at this step; 0 = run to the end
  return config
