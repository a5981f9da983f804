"""Names and numbers shared by the operator, the trainer and the server, so they agree by construction."""

from typing import Final

GROUP: Final = "kiln.dev"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"
KIND: Final = "TrainingJob"
PLURAL: Final = "trainingjobs"
SINGULAR: Final = "trainingjob"
SHORT_NAMES: Final = ("tj",)

# Exit code of the trainer for an invalid config or data set (sysexits' EX_CONFIG). The operator's Job
# podFailurePolicy fails the job at once on it instead of retrying something that can never work.
EXIT_CONFIG_ERROR: Final = 78
# Exit code of a trainer that lost a peer of its process group (sysexits' EX_TEMPFAIL): the failure that
# counts is the lost peer's own, so the Job's podFailurePolicy ignores this one in its backoff count.
EXIT_PEER_LOST: Final = 75

# Files and folders inside a trainer's output directory.
MODEL_CARD_FILE: Final = "model-card.json"
MODELS_DIR: Final = "models"
CHECKPOINTS_DIR: Final = "checkpoints"
MODEL_FILE: Final = "model.onnx"
OPTIMIZED_MODEL_FILE: Final = "model.optimized.onnx"
# int8-static's graph for TensorRT (symmetric int8), beside the CPU one, when the model is served on a GPU.
TENSORRT_MODEL_FILE: Final = "model.tensorrt.onnx"

# Where the artifacts volume is mounted in trainer and serving pods; a job writes under
# ARTIFACTS_MOUNT/<namespace>/<name>/<uid> (reported as status.artifactsPath).
ARTIFACTS_MOUNT: Final = "/artifacts"
DATA_MOUNT: Final = "/data"
WEIGHTS_MOUNT: Final = "/weights"
# Files the trainer writes beside the checkpoints: the per-epoch history and the plots of the run.
HISTORY_FILE: Final = "history.csv"
PLOTS_DIR: Final = "plots"
CONFIG_MOUNT: Final = "/etc/kiln"
CONFIG_FILE: Final = "trainingjob.yaml"

# Ports.
SERVING_HTTP_PORT: Final = 8080
# KServe's and MLServer's gRPC port for the Open Inference Protocol (Triton uses 8001).
SERVING_GRPC_PORT: Final = 8081
TRAINER_METRICS_PORT: Final = 9400
OPERATOR_METRICS_PORT: Final = 9401
OPERATOR_HEALTH_PORT: Final = 8081
DDP_MASTER_PORT: Final = 29500

# Environment the operator gives trainer pods.
ENV_TRAININGJOB_NAME: Final = "KILN_TRAININGJOB_NAME"
ENV_TRAININGJOB_NAMESPACE: Final = "KILN_TRAININGJOB_NAMESPACE"
# Set by the operator (and the per-pod launcher) in every trainer process, so spec.resources.env may not.
RESERVED_TRAINER_ENV: Final = (
    ENV_TRAININGJOB_NAME, ENV_TRAININGJOB_NAMESPACE, "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
    "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT", "PYTHONUNBUFFERED", "HOME", "TMPDIR",
)  # fmt: skip

# Kueue: the label naming the LocalQueue a workload is submitted to, and the WorkloadPriorityClass label;
# both are copied from the TrainingJob to its Job, where Kueue's Job integration reads them.
KUEUE_QUEUE_LABEL: Final = "kueue.x-k8s.io/queue-name"
KUEUE_PRIORITY_LABEL: Final = "kueue.x-k8s.io/priority-class"

LABEL_TRAININGJOB: Final = f"{GROUP}/trainingjob"
LABEL_COMPONENT: Final = "app.kubernetes.io/component"
