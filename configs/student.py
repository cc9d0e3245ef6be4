"""The student: data, tokenizer, teacher records, model, training, mesh.

Presets (select with `:preset`):
  tiny   112 px frames, small VGGT and decoder; the built-in synthetic data; runs on 2 CPU cores.
  small  224 px, a wider model; a single GPU/TPU host.
  paper  518 px, VGGT-1B aggregator + 24-layer 2048-wide decoder (~2.29B), Llama-2 vocabulary.

Run:  python run.py --config=configs/student.py:tiny --workdir=/tmp/sd
"""

from __future__ import annotations

import pathlib

import ml_collections
from ml_collections import config_dict

from configs import common
from data_pipelines import spatial_qa, synthetic

# The tiny VGGT the vision stage pretrained on the synthetic training scenes (its provenance,
# command and held-out figures: the .json beside it). The tiny preset reads it frozen.
TINY_VISION_CHECKPOINT = str(pathlib.Path(__file__).resolve().parents[1] / "spatial_distill"
                             / "pretrained" / "vggt_tiny_synthetic.safetensors")

PRESETS = {
    "tiny": dict(
        # 2,000 steps: the relations are learned by ~1,000-1,800 (docs/learning.md); 0.35-0.45 s/step on 2 cores.
        image_size=112, train=1000, eval=200, batch=8, steps=2000, vocab=384,
        vision=dict(embed_dim=64, depth=4, num_heads=4, vit_depth=2, vit_heads=4,
                    checkpoint=TINY_VISION_CHECKPOINT, frozen=True),
        decoder=dict(hidden=128, layers=4, heads=4, kv_heads=2, mlp=352, context=512, scan=False),
        depth=dict(features=32, out_channels=(16, 32, 64, 64), layers=(0, 1, 2, 3)),
        det=dict(queries=16, dim=64, layers=2, heads=4, classes=3),
        objects=dict(enabled=True, classes=3, hidden=128, camera_trunk=2, frozen=True,
                     camera_trains_trunk=False, register=True),
        pool="objects64", latents=8, depth_head=False, det_head=False, geometry_gain=3.0,
        vision_stage=dict(steps=5000, batch=8, lr=2e-3, warmup=100)),
    "small": dict(
        image_size=224, train=4000, eval=500, batch=32, steps=20000, vocab=32000,
        vision=dict(embed_dim=384, depth=12, num_heads=6, vit_depth=12, vit_heads=6),
        decoder=dict(hidden=1024, layers=12, heads=16, kv_heads=16, mlp=2816, context=2048, scan=True),
        depth=dict(features=128, out_channels=(96, 192, 384, 384), layers=(2, 5, 8, 11)),
        det=dict(queries=32, dim=256, layers=3, heads=8, classes=18),
        objects=dict(enabled=True, classes=18, hidden=256, camera_trunk=4, frozen=False),
        pool="grid8", latents=8, depth_head=True, det_head=True, geometry_gain=1.0,
        vision_stage=dict(steps=20000, batch=32, lr=1e-3, warmup=1000)),
    # VGGT-1B aggregator, depth and camera heads, a 24-layer 2048-wide SwiGLU decoder: ~2.29B.
    "paper": dict(
        image_size=518, train=4000, eval=500, batch=64, steps=20000, vocab=32000,
        # VGGT frozen, as the paper trains it (its depth and box heads still train on its tokens).
        vision=dict(embed_dim=1024, depth=24, num_heads=16, vit_depth=24, vit_heads=16, frozen=True),
        decoder=dict(hidden=2048, layers=24, heads=16, kv_heads=16, mlp=5504, context=2048, scan=True),
        depth=dict(features=256, out_channels=(256, 512, 1024, 1024), layers=(4, 11, 17, 23)),
        det=dict(queries=64, dim=256, layers=6, heads=8, classes=18),
        # The object head needs VGGT-1B's camera head (216M), beyond the paper's 2.29B budget:
        # off here, `--config.model.object_head.enabled=True` adds both.
        objects=dict(enabled=False, classes=18, hidden=512, camera_trunk=4, frozen=False),
        pool="grid2", latents=8, depth_head=True, det_head=True, geometry_gain=1.0,
        vision_stage=dict(steps=20000, batch=64, lr=1e-4, warmup=1000)),
}


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    c = ml_collections.ConfigDict()
    c.preset = preset
    c.mode = "pipeline"  # pipeline (every stage in order) | data
    c.seed = 0

    c.data = common.data_config(image_size=p["image_size"], num_train_scenes=p["train"],
                                num_eval_scenes=p["eval"])

    c.tokenizer = ml_collections.ConfigDict()
    # The teacher's tokenizer (a tokenizer.model / tokenizer.json or its directory). None: train
    # the built-in byte-level BPE on the synthetic QA and save it in WORKDIR/tokenizer.
    c.tokenizer.path = config_dict.placeholder(str)
    c.tokenizer.vocab_size = p["vocab"]  # size of the built-in BPE (must equal the decoder's)

    c.teacher = ml_collections.ConfigDict()
    # oracle: the synthetic-data oracle (answers from GT, calibrated); llava3d: the Flax
    # LLaVA-3D port on a local checkpoint (teacher.path); hf: a local Hugging Face causal LM or
    # LLaVA model run by transformers in torch (GPU users).
    c.teacher.kind = "oracle"
    c.teacher.path = config_dict.placeholder(str)  # llava3d / hf: the checkpoint directory
    # llava3d: the CLIP ViT-L/14-336 directory (upstream loads it separately); None: the tower's
    # keys inside teacher.path.
    c.teacher.clip_path = config_dict.placeholder(str)
    c.teacher.dtype = "float32"  # llava3d / hf compute dtype (bfloat16 on accelerators)
    c.teacher.batch_size = 8  # questions per teacher call (padded to it: one compiled shape)
    c.teacher.max_new_tokens = 32  # greedy answer budget, EOS included
    # llava3d 3D inputs: sensor (the scene's depth, intrinsics, poses) | vggt (predicted from the
    # RGB views by VGGT weights at teacher.vggt_path: scenes without depth sensors).
    c.teacher.geometry = "sensor"
    # llava3d: 3d (every view, voxel tokens) | 2d (view 0 as one image, 576 tokens; scenes
    # without depth or poses when VGGT is not wanted).
    c.teacher.llava_mode = "3d"
    c.teacher.vggt_path = config_dict.placeholder(str)
    c.teacher.vggt_config = config_dict.placeholder(str)  # its config.json; None: VGGT-1B
    c.teacher.vggt_image_width = 518  # VGGT's input width (a multiple of 14)
    # Metres to set each scene's median predicted depth to (VGGT is metric only up to its
    # training normalisation); None keeps VGGT's units.
    c.teacher.vggt_median_depth = config_dict.placeholder(float)
    # llava3d: (data, fsdp, tensor) over this process's devices; each process dumps its own
    # shards. Tensor parallel by default: the 7B's 32 heads split over a host's chips.
    c.teacher.mesh = (1, 1, -1)
    c.teacher.k = 32  # top-K log-probs stored per answer token
    # Temperature of the stored teacher distribution; the KD loss uses the same (records store
    # log-probs at it). The paper uses 3; the tiny preset's 384-entry vocabulary would turn a
    # T=3 oracle distribution into mostly uniform mass, so it distils at 1.
    c.teacher.temperature = 1.0 if preset == "tiny" else 3.0
    c.teacher.records_dir = config_dict.placeholder(str)  # None -> WORKDIR/records
    c.teacher.num_shards = 4  # per split; a multiple of the process count
    # Oracle calibration: P(correct answer) = sigmoid(margin / scale) mixed towards
    # `floor`..`ceiling`, where margin is how far the geometry is from the decision threshold.
    c.teacher.oracle_ceiling = 0.95
    c.teacher.oracle_floor = 0.6
    c.teacher.oracle_scale = 0.1  # metres (or ratio units for size) per unit of logit

    c.input = ml_collections.ConfigDict()  # static batch shapes (errors, never truncation)
    c.input.max_questions = 17  # the synthetic QA asks at most 4 per kind + 1 count
    # Padded lengths of a question's prompt (BOS included) and answer (EOS included). Padding
    # changes no result but costs decoder work on every question. None: the records' longest
    # (`teacher_meta.json`; the dump then keeps any answer within teacher.max_new_tokens). The
    # tiny preset's BPE is trained per seed, so its longest answer moves between seeds (13 / 5 on
    # seed 0, 13 / 4 on seed 1); the fixed 14 / 8 it had cost 14-19% of its step
    # (docs/benchmarks.md). small and paper keep fixed shapes, which AOT compiles
    # (config.mode=aot) need without records.
    c.input.max_prompt_len = config_dict.placeholder(int) if preset == "tiny" else 32
    c.input.max_answer_len = config_dict.placeholder(int) if preset == "tiny" else 8
    c.input.max_boxes = 16
    c.input.shuffle_buffer = 128

    c.model = model_config(p)

    c.train = ml_collections.ConfigDict()
    c.train.steps = p["steps"]
    c.train.batch_size = p["batch"]  # global batch (samples, each with all its questions)
    c.train.learning_rate = 2e-3 if preset == "tiny" else 1e-4  # AdamW peak
    c.train.warmup_steps = 30 if preset == "tiny" else 1000
    # After warmup: cosine to 0, or wsd (constant, then linear to 0 over the last decay_fraction).
    # Tiny: wsd, since the relations are learned one after another and the last (left/right on
    # seed 1) arrives after step 1,500, where a cosine has already fallen below 15% (docs/learning.md).
    c.train.schedule = "wsd" if preset == "tiny" else "cosine"
    c.train.decay_fraction = 0.2
    c.train.weight_decay = 0.01
    c.train.grad_clip = 1.0  # global-norm clipping
    # Learning-rate multiplier for the pretrained vision side (aggregator, camera and object
    # heads) when it is not frozen: at the decoder's rate it unlearns its fields (docs/learning.md).
    c.train.vision_lr_scale = 1.0
    c.train.accum_steps = 1  # gradient accumulation (micro-batches per update)
    c.train.log_every = 10
    c.train.checkpoint_every = 100
    c.train.keep_checkpoints = 3
    c.train.nan_patience = 5  # consecutive non-finite steps before stopping
    c.train.eval_every = 0  # 0: evaluate once at the end
    c.train.verify_records = True  # check every record (content hash included) before training
    # With the whole vision side frozen, compute it once per training sample instead of every
    # step (train/vision_cache.py; single-process runs).
    c.train.cache_vision = True

    c.loss = ml_collections.ConfigDict()
    c.loss.alpha = 0.7  # KD weight; 1 - alpha goes to CE on the teacher's greedy answer
    c.loss.temperature = c.teacher.temperature  # KD temperature (must equal the dump's)
    c.loss.tail = "bucket"  # bucket | renormalize | ignore
    c.loss.chunked = True  # never form full fp32 [tokens, vocab] logits
    c.loss.chunk_size = 8192
    # kendall | static | dwa. Tiny: static, since Kendall weighting lowers the grounding weight to
    # ~0.4 before the binding is learned, which slows it (docs/learning.md).
    c.loss.weighting = "static" if preset == "tiny" else "kendall"
    c.loss.kendall_range = (-4.0, 4.0)  # clamp of the learned log-variances: weights in ~[0.02, 55]
    # The paper's static ablation (text 1, depth .15, det .35); the tasks it lacks get 1.
    c.loss.static_weights = {"text": 1.0, "depth": 0.15, "det": 0.35, "ground": 1.0,
                             "objects": 1.0, "camera": 1.0}
    c.loss.dwa_temperature = 2.0
    c.loss.text = True  # KD + CE on the teacher's answers
    # The answer position regresses the referred objects' boxes, class and colour in camera 0's
    # frame (losses/grounding.py): without it the decoder stays at the text prior. False: ablation.
    c.loss.grounding = True
    # With grounding, the answer position also regresses the signed margin of the relation a
    # question asks (losses/grounding.relation_loss): word -> sign and axis it compares along.
    # Without it the student answers "bigger" as "smaller" (docs/learning.md). {}: off.
    # "near": the boxes' separating-axis gap below the dataset's 0.15 m (data_pipelines/spatial_qa.NEAR),
    # which decides every synthetic "near" question as the labels do (`gap<t`, centre distance less
    # mean half extents, decides 5% of them wrongly). "touching" (yes at <= 1 mm, no from 2 cm): the
    # same gap below 1 cm, `*50` so the targets reach the readout's clip instead of sitting within
    # 0.01 of zero; without it "touching" is the relation the main job misses (seed 1: 0.72,
    # docs/learning.md). "off": no target.
    c.loss.relations = {"bigger": "+size", "smaller": "-size", "left": "+x", "right": "-x",
                        "front": "+z", "behind": "-z", "near": "surface<0.15",
                        "touching": "surface<0.01*50"}
    # x the relation MSE, added to the `ground` task's loss. Tiny: 4 (seed 1 learns the relations
    # by step 2,000 with it; 10 slows the binding they depend on: docs/learning.md).
    c.loss.relation_weight = 4.0 if preset == "tiny" else 1.0
    c.loss.objects = True  # object head + camera head losses (only while the vision side trains)
    c.loss.object_stride = 2  # ownership of every 2nd pixel (a divisor of the 14-px patch)
    c.loss.object_margin = 0.02  # metres: a back-projected pixel within this of a box belongs to it
    # Of a patch's sampled pixels for the patch to see an object: one sample at stride 2, so
    # small or half-hidden objects keep their patches.
    c.loss.object_min_fraction = 0.02
    c.loss.depth = True
    c.loss.detection = True

    c.vision = ml_collections.ConfigDict()  # the vision stage (config.mode=vision)
    vs = p["vision_stage"]
    c.vision.steps = vs["steps"]  # pretraining steps of the aggregator + camera and object heads
    c.vision.batch_size = vs["batch"]
    c.vision.learning_rate = vs["lr"]
    c.vision.warmup_steps = vs["warmup"]
    c.vision.schedule = "cosine"  # as the shipped tiny checkpoint was trained
    c.vision.eval_every = 500
    # A vision-stage export (vggt.safetensors) to start from instead of random weights: the
    # schedule above then continues its training (e.g. on more scenes); None: from scratch.
    c.vision.init_checkpoint = config_dict.placeholder(str)

    c.eval = ml_collections.ConfigDict()
    c.eval.report_samples = 3  # held-out samples drawn in WORKDIR/eval/report.md

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (-1, 1, 1)  # (data, fsdp, tensor); one -1 fills the remaining devices

    # config.mode=export (spatial_distill/export/): the latest checkpoint as PyTorch artifacts.
    c.export = ml_collections.ConfigDict()
    c.export.dir = config_dict.placeholder(str)  # OUT; refused when it exists and is not empty
    c.export.overwrite = False  # replace a non-empty OUT
    c.export.dtype = "float32"  # float32 | bfloat16
    c.export.max_shard_bytes = 5 * 2**30  # the decoder's safetensors are sharded above this

    # config.mode=aot (spatial_distill/aot.py): compile the train step for a TPU slice on this host.
    c.aot = ml_collections.ConfigDict()
    c.aot.topology = "v5e:2x2"  # <chip>:<shape>, e.g. v5e:2x4 (v5e-8), v5e:4x4, v5p:2x2x1
    c.aot.search_batch = False  # also find the largest global batch that fits (many compiles)
    c.aot.max_batch = 4096  # the search's upper limit

    c.lock()
    return c


def model_config(p: dict) -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    v = m.vision = ml_collections.ConfigDict()  # VGGT aggregator (DINOv2 patch embed inside)
    v.embed_dim = p["vision"]["embed_dim"]
    v.depth = p["vision"]["depth"]  # frame/global block pairs
    v.num_heads = p["vision"]["num_heads"]
    v.vit_depth = p["vision"]["vit_depth"]  # DINO patch-embed blocks
    v.vit_heads = p["vision"]["vit_heads"]
    # VGGT weights (safetensors / .pt): official VGGT-1B, or the vision stage's export.
    v.checkpoint = p["vision"].get("checkpoint") or config_dict.placeholder(str)
    # Pixels of the checkpoint's DINO pos-embed grid; None: 518 with a checkpoint (official
    # VGGT's), else the image size.
    v.pos_embed_size = p["image_size"] if v.checkpoint else config_dict.placeholder(int)
    v.frozen = p["vision"].get("frozen", False)  # stop gradients at the aggregator (the paper freezes VGGT)
    v.dtype = "float32"  # aggregator compute dtype (heads always float32)
    v.remat = False

    d = m.decoder = ml_collections.ConfigDict()  # Llama family; shares the teacher's tokenizer
    d.vocab_size = p["vocab"]
    d.hidden_size = p["decoder"]["hidden"]
    d.num_layers = p["decoder"]["layers"]
    d.num_heads = p["decoder"]["heads"]
    d.num_kv_heads = p["decoder"]["kv_heads"]
    d.intermediate_size = p["decoder"]["mlp"]
    d.max_position_embeddings = p["decoder"]["context"]
    # A local Hugging Face Llama-family directory to start the decoder from (shapes and vocabulary
    # must match the fields here; its tokenizer goes in config.tokenizer.path).
    d.checkpoint = config_dict.placeholder(str)
    d.rope_theta = 10000.0
    d.rms_norm_eps = 1e-5
    d.tie_word_embeddings = False
    # One scanned layer compiles once for any depth. The tiny decoder's 4 layers unroll instead:
    # XLA:CPU moves the scan's stacked activations through dynamic slices, ~15% of its step.
    d.scan_layers = p["decoder"]["scan"]
    d.remat_policy = "none"  # none | full | dots_saveable | dots_with_no_batch_dims_saveable
    d.dtype = "float32"  # compute dtype (bfloat16 on accelerators)

    # Attention of every model (student and teacher): xla | pallas (our flash kernel, interpreted
    # on CPU) | splash (JAX's TPU kernel) | cudnn (GPU) | auto (pallas on TPU, cudnn on GPU, xla
    # on CPU); kernel block sizes as kind:BQxBK, e.g. pallas:256x128 (kernels/attention.py).
    m.attention = "xla"
    m.vision_pool = p["pool"]  # mean1 (the paper's) | grid<g> per view | patch | objects<k> | slots<k>
    # objects<k> counts patches, so k must grow with the image area: objects64 is a quarter of the
    # tiny preset's 4 x 8 x 8 patches at 112 px; at 168 px the same quarter is objects144, and
    # objects64 there drops whole objects (docs/learning.md, "At 168 pixels").
    m.slots = ml_collections.ConfigDict()  # vision_pool slots<k>: patches grouped into objects
    m.slots.radius = 0.75  # metres between a patch's predicted object centre and its seed's
    m.slots.colour_scale = 0.15  # RGB distance in [0, 1] within which a patch joins a slot
    m.slots.min_objectness = 0.5  # seeds below it leave their slot empty
    # Word grounding (models/word_tags.py): a question word that names an object's class or colour
    # retrieves the object tokens whose predicted class and colour it names. Tiny: the synthetic
    # classes and palette; the presets whose 18 classes have no names here (ScanNet's, issue 15)
    # leave it off.
    w = m.object_words = ml_collections.ConfigDict()
    w.enabled = p["objects"]["enabled"] and p["objects"]["classes"] == len(spatial_qa.KINDS)
    w.classes = spatial_qa.KINDS  # one name per object-head class, in class order
    # Named colours and the RGB the renderer shows each in: its albedo times the mean shading
    # (observed / albedo = 0.57 over 3,719 held-out object patches, as the shipped head predicts).
    w.colours = {name: tuple(round(0.57 * x, 4) for x in rgb) for name, rgb in synthetic.PALETTE.items()}
    w.colour_temperature = 0.005  # softmax over squared RGB distance: 0.91 mass on the right name
    w.gain = 0.0  # x the tags added to the object tokens themselves (0: off)
    # Question words retrieve the object tokens whose tags match them (Student.ground_words).
    w.retrieve = True
    w.retrieve_temperature = 0.05
    w.retrieve_threshold = 0.35
    # x the object fields' centre, log size and yaw where the projector and the word values read
    # them (Student._linear_inputs): at 1 the patch features swamp the centre's x, and left/right
    # are learned in some runs only (docs/learning.md, "Left/right"). Tiny: 3. The presets whose
    # fields come from another VGGT have not been measured: 1.
    m.geometry_gain = p["geometry_gain"]
    m.num_latents = p["latents"]  # Hidden-CoT latent tokens K (0 disables)
    m.latent_position = "before_question"  # before_question [V][T][Q][A] | after_question [V][Q][T][A]

    dh = m.depth_head = ml_collections.ConfigDict()  # VGGT DPT depth head
    # The tiny preset leaves the DPT depth head off: at full resolution on 2 CPU cores it
    # multiplies the step time by ~5 (the paper preset keeps it).
    dh.enabled = p["depth_head"]
    dh.features = p["depth"]["features"]
    dh.out_channels = p["depth"]["out_channels"]
    dh.layers = p["depth"]["layers"]  # aggregator layers the DPT reads
    # Frames per sequential, rematerialised chunk (0: all at once). A 518 px frame needs ~1.1 GiB
    # of forward + backward temporaries, so this bounds the head's memory (docs/benchmarks.md).
    dh.frames_chunk = 8

    o = m.object_head = ml_collections.ConfigDict()  # dense per-patch objects (object_head.py)
    o.enabled = p["objects"]["enabled"]  # also adds VGGT's camera head, which places the objects
    o.num_classes = p["objects"]["classes"]
    o.hidden = p["objects"]["hidden"]
    o.camera_trunk_depth = p["objects"]["camera_trunk"]  # VGGT-1B's camera head has 4
    # Whether the camera loss trains the aggregator too (VGGT's own training) or only the head:
    # from scratch at the tiny scale it stalls and crowds out the object objective.
    o.camera_trains_trunk = p["objects"].get("camera_trains_trunk", True)
    # Place views 1.. by registering their predicted object centres onto view 0's (a weighted
    # Kabsch fit) rather than by the camera head's extrinsics alone (object_head.py).
    o.register_views = p["objects"].get("register", False)
    # Freeze the object and camera heads (pretrained by the vision stage, as in `tiny`); unfrozen
    # they train with the `objects` and `camera` losses.
    o.frozen = p["objects"]["frozen"]

    # The grounding head on the first answer position (losses/grounding.py).
    m.grounding = True

    det = m.det_head = ml_collections.ConfigDict()  # DETR-style 3D boxes
    # The tiny preset reads objects from the object head; a DETR head from scratch stays on its
    # no-object plateau for thousands of steps while its loss (~12) dominates the clipped
    # gradient (docs/learning.md).
    det.enabled = p["det_head"]
    det.num_queries = p["det"]["queries"]
    det.dim = p["det"]["dim"]
    det.num_layers = p["det"]["layers"]
    det.num_heads = p["det"]["heads"]
    det.num_classes = p["det"]["classes"]
    return m
