"""PyTorch artifacts of a trained student (`config.mode=export`)."""

# The export directory's layout (stage.py writes it, torch_student.py reads it).
DECODER_DIR = "decoder"
VGGT_FILE = "vggt.safetensors"
STUDENT_FILE = "student.safetensors"
STUDENT_CONFIG = "student_config.json"
CONFIG_VERSION = 1  # of student_config.json
