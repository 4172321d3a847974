"""Which exceptions are the user's to fix (one-line message, exit 3) and which are recoverable
failures (a crashed actor: work stays pending in the ledger, exit 4)."""
from pipeline.audit import AuditError
from pipeline.baselines.base import BaselineError
from pipeline.checkpoints import CheckpointIntegrityError
from pipeline.cluster import ClusterError
from pipeline.config import ConfigError
from pipeline.data.datasets import DataError
from pipeline.data.partition import PartitionError
from pipeline.driver import ShardFailure
from pipeline.finetune import FinetuneError
from pipeline.ledger import ForgetRequestError
from pipeline.privacy import PrivacyError
from pipeline.runs import RunError
from pipeline.scoring import ScoreError

USER_ERRORS = (ConfigError, DataError, PartitionError, ForgetRequestError, RunError, ClusterError,
               PrivacyError, FinetuneError, ScoreError, BaselineError,
               CheckpointIntegrityError, AuditError)
RECOVERABLE = (ShardFailure,)
