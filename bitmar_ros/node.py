"""BitMarNode: camera + captions in, persistent episodic memory, streaming descriptions out.

A thin adapter: ROS callbacks (one executor thread) only convert and enqueue (bounded, counted);
one worker thread runs the model (episodes, descriptions); one query thread serves the memory
queries (retrieval, and answers that decode up to ``answer_max_new_tokens`` tokens), so that neither
holds up the camera and caption callbacks. The model lock is taken per decoded token, so a query is
answered while a description is being generated. Everything model- or storage-shaped is
``bitmar_core``: episodes are recorded, queried, answered, saved and cleared by
``bitmar_core.episodes.service.EpisodicMemoryService``.

Rules at the door (each counted in ``/diagnostics``):

- A frame that cannot be converted is rejected (``frame_rejected``). A frame whose header stamp is
  not positive (``sec * 10**9 + nanosec <= 0``: unset, or negative on the wire) is accepted, and its
  stamp is replaced by the node's clock when its callback runs (``frame_stamp_replaced``; logged at
  most every 10 s): pairing uses reception times anyway, the stamp only labels the episode, and a
  camera driver that never stamps its frames still works. The replaced stamp is what the episode is
  stored under and what ``episodes`` / ``description_stream`` carry.
- A blank or oversized caption is rejected (``text_rejected``); a caption with no camera frame within
  ``pair_tolerance_s`` of its reception is rejected as well (``text_rejected`` and
  ``text_unpaired``); when the caption queue is full the oldest caption is dropped (``text_dropped``).
- Rejection reasons quote hostile input: each is clipped to ``MAX_REASON_BYTES`` before it is counted,
  kept or logged; the node keeps (and logs once) at most ``MAX_LOGGED_REASONS`` distinct reasons and
  ``MAX_REASONS_BYTES`` bytes of them, then only counts. Service replies quote at most
  ``MAX_REPLY_BYTES``; a log line is at most ``MAX_LOG_BYTES`` (a traceback ``MAX_TRACEBACK_BYTES``).

Logging: every line goes through ``NodeLog`` (``self._log``), never through ``get_logger()`` directly.
rclpy's logger keys its filters (throttle, once, ...) by call site, and in rclpy 9 the deprecated
``.warn`` wrapper makes all ``.warn(...)`` calls one call site, so mixing plain and throttled calls
raised ``ValueError`` in whichever thread logged second (it killed the worker and the executor).
``NodeLog`` calls the rclpy logger from one fixed line per severity and never with rclpy filters;
throttling is its own, per key.

No silent death: every thread the node runs is guarded. The worker's loop runs under
``_run_guarded``; each executor callback is wrapped by ``_guarded`` and the executor's spin loop in
``spin`` catches what escapes it. An unexpected exception is logged with its traceback, counted
(``worker_errors`` for a job, ``callback_errors``, ``thread_crashes``), and makes ``/diagnostics``
report ERROR for ``ERROR_HOLD_S`` seconds; a crashed loop is restarted after a short back-off
(``thread_restarts``). Restarting in place was chosen over exiting for ``respawn``: the queued
captions (pinned to their frames) and the loaded model survive, and a restart takes milliseconds
instead of seconds of model loading during which the camera is not heard. A loop that crashes
``CRASH_LOOP_COUNT`` times within ``CRASH_LOOP_WINDOW_S`` is not fixable from inside: the node then
shuts down cleanly and exits with code ``EXIT_CRASH_LOOP`` (3), for ``respawn`` to bring it back.

Where and how long (issue 18): with a pose source (``pose_topic`` of type ``pose_topic_type``, or tf2
with ``pose_tf_frame`` where ``tf2_ros`` is importable) each episode is stored with the pose at its
frame's stamp, interpolated in a ring of recent poses (``bitmar_core.episodes.pose``); a frame whose stamp
falls in a gap gets none (``pose_missing_gap``, ``pose_missing_no_pose``, ``pose_missing_tf``).
Queries may ask for episodes near a point (``near_frame``/``near``/``radius_m``) and have the top
episode's pose published on ``~/goal_pose``. The ``retention_*`` parameters bound the store as
episodes arrive; ``~/forget`` deletes chosen episodes (the memory matrix keeps its superposition).

Lifecycle: a managed node (``rclpy.lifecycle``). Configure loads the checkpoint, opens the store,
restores the memory, creates the subscriptions, publishers and services and starts the worker;
activate lets frames and captions in and descriptions and episodes out; deactivate first commits
every caption already accepted (nothing is lost), then pauses: frames and captions that arrive while
configured but inactive are counted (``frames_inactive``, ``text_inactive``) and logged, not stored;
queries and ``/diagnostics`` go on. Cleanup stops the worker, saves the memory state and closes the
store; shutdown does the same from any state and the process then exits 0. With ``autostart`` (the
default) the constructor configures and activates, so the node starts as a plain node does.

Shutdown: the node handles SIGINT and SIGTERM itself (rclpy's handlers would shut the ROS context
down at once, under a worker still publishing). It stops the worker, persists the memory state,
closes the store, then destroys the node and shuts rclpy down (which also ends rclpy's signal
thread), and exits 0. Further signals during shutdown are logged and ignored: ``ros2 launch``
without a terminal sends SIGINT to the process group too, then escalates to SIGTERM, and either
used to kill the node inside its shutdown with the memory state unsaved. Shutdown is bounded (the
worker is joined for at most 30 s); SIGKILL, launch's last step, still ends a wedged one.
"""
from __future__ import annotations

import collections
import functools
import os
import signal
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecyclePublisher, LifecycleState, TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.logging import LoggingSeverity
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.signals import SignalHandlerOptions
from rclpy.service import Service
from rclpy.subscription import MessageInfo, Subscription
from rclpy.task import Future
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, SetParametersResult
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String
from std_srvs.srv import Trigger

from geometry_msgs.msg import PoseStamped

from bitmar_core.episodes.service import EpisodicError, EpisodicMemoryService, model_input
from bitmar_core.episodes.pose import Pose, PoseError, PoseRing, PoseRingConfig
from bitmar_core.inference.runtime import BitMarRuntime, RuntimeLoadError
from bitmar_core.episodes.store import EpisodeStore
from bitmar_core.episodes.store_api import EpisodeStoreAPI, RetentionPolicy, SpatialFilter, StoreError
from bitmar_ros import params as P
from bitmar_ros.image_conversion import ImageConversionError, compressed_to_rgb8, image_to_rgb8
from bitmar_ros.msg import Description, Episode
from bitmar_ros.pairing import CameraLag, CaptionQueue, RecentFrames
from bitmar_ros.srv import Forget, QueryMemory

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CHECKPOINT_NAME = "bitmar_default.safetensors"
MAX_LOGGED_REASONS = 1000  # distinct rejection reasons logged before the node only counts them
MAX_REASONS_BYTES = 256 * 1024  # ... and the bytes of those reasons
MAX_REASON_BYTES = 512  # one rejection reason (it quotes hostile input) as counted, kept and logged
MAX_REPLY_BYTES = 1024  # the message of a service reply
MAX_LOG_BYTES = 2048  # one log line
MAX_TRACEBACK_BYTES = 16384  # one log line holding a traceback
ERROR_HOLD_S = 60.0  # /diagnostics says ERROR this long after an unexpected exception
CRASH_LOOP_COUNT = 5  # crashes of one loop within CRASH_LOOP_WINDOW_S: exit for respawn instead
CRASH_LOOP_WINDOW_S = 60.0
EXIT_CRASH_LOOP = 3
MAX_PENDING_QUERIES = 8  # queries waiting for the query thread; more are answered "busy"
# Frames handled before a late caption callback that may pair with it (pairing.RecentFrames): all of
# the last 0.5 s, older ones 0.2 s apart, 32 in all (~3.5 s at 30 Hz, ~5.5 s at 10 Hz).
RECENT_FRAMES = 32
RECENT_DENSE_NS = 500_000_000
RECENT_SPARSE_GAP_NS = 200_000_000
# How long past its horizon a caption waits for a camera callback to hand over a nearer frame:
# twice the worst recent callback lag, at least the floor, at most the cap (pairing.CameraLag).
CAMERA_LAG_FLOOR_NS = 500_000_000
CAMERA_LAG_CAP_NS = 5_000_000_000
DRAIN_MARGIN_S = 30.0  # deactivate waits pair_tolerance_s + this for accepted captions to be committed


class StartupError(Exception):
    """A problem that stops the node before it runs: bad parameter, checkpoint or store."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class Frame:
    """A converted camera frame, already resized to the backbone's input size."""
    seq: int
    stamp_ns: int            # header stamp of the camera message
    recv_ns: int             # middleware reception time, system clock (what captions are paired against)
    header: object
    rgb: np.ndarray          # (H, W, 3) uint8 at the model's input size
    thumbnail: np.ndarray    # small copy of the frame for the store


def default_checkpoint() -> str:
    """The bundled checkpoint: the install tree's share dir on a robot, else this source checkout."""
    candidates = []
    try:
        from ament_index_python.packages import get_package_share_directory
        candidates.append(Path(get_package_share_directory("bitmar_ros")) / "checkpoints" / DEFAULT_CHECKPOINT_NAME)
    except Exception:  # not installed through ament: fall back to the checkout
        pass
    candidates.append(REPO_ROOT / "checkpoints" / DEFAULT_CHECKPOINT_NAME)
    for c in candidates:
        if c.is_file():
            return str(c)
    return str(candidates[-1])


def _received_ns(info: MessageInfo) -> int:
    """When the middleware received the message (system clock): the executor may run callbacks
    late and out of order, so their own run time says little about what arrived when."""
    return int(info.get("received_timestamp") or 0) or time.time_ns()


def _gap_s(frame: "Frame | None", t_ns: int) -> str:
    return "none" if frame is None else f"{abs(frame.recv_ns - t_ns) / 1e9:.3f} s"


def _stamp_ns(stamp) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def _set_pose(msg: Episode, pose: Pose | None, stamp) -> None:
    """An Episode message's pose fields (has_pose false without one)."""
    msg.has_pose = pose is not None
    if pose is None:
        return
    msg.pose.header.frame_id = pose.frame_id
    msg.pose.header.stamp = stamp
    p, q = msg.pose.pose.position, msg.pose.pose.orientation
    p.x, p.y, p.z = pose.position
    q.x, q.y, q.z, q.w = pose.orientation


class _Percentiles:
    """A bounded window of latencies for diagnostics (no unbounded growth over days)."""

    def __init__(self, size: int = 512) -> None:
        self._v: collections.deque[float] = collections.deque(maxlen=size)

    def add(self, value_s: float) -> None:
        self._v.append(value_s)

    def get(self, q: float) -> float:
        return float(np.percentile(np.fromiter(self._v, float), q)) if self._v else float("nan")


def clip(text: str, max_bytes: int) -> str:
    """``text`` cut to at most ``max_bytes`` UTF-8 bytes, ending with a note of how much was cut.
    Costs O(max_bytes) whatever the length of ``text`` (hostile input may be megabytes)."""
    if len(text) * 4 <= max_bytes:  # short enough whatever its characters
        return text
    head = text[:max_bytes].encode("utf-8", "backslashreplace")
    if len(head) <= max_bytes and len(text) <= max_bytes:
        return text
    note_room = 48
    kept = head[:max(0, max_bytes - note_room)].decode("utf-8", "ignore")
    return f"{kept}... [{len(text) - len(kept)} more characters cut]"


class NodeLog:
    """The node's only way to log (see the module docstring): rclpy's logger is called from one
    fixed line per severity, never with rclpy's filters, so no call can conflict with another.
    Lines are clipped to ``max_bytes``; ``every_s`` throttles per ``key`` (a constant of the code, so
    the table stays small) and the next line of that key says how many were left out."""

    def __init__(self, logger, max_bytes: int = MAX_LOG_BYTES) -> None:
        self._logger = logger
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self.failures = 0  # lines that could not be logged (reported on stderr instead)
        self._last: dict[str, float] = {}
        self._skipped: collections.Counter[str] = collections.Counter()

    def debug(self, message: str, *, every_s: float = 0.0, key: str = "", max_bytes: int = 0) -> bool:
        return self._log(LoggingSeverity.DEBUG, message, every_s, key, max_bytes)

    def info(self, message: str, *, every_s: float = 0.0, key: str = "", max_bytes: int = 0) -> bool:
        return self._log(LoggingSeverity.INFO, message, every_s, key, max_bytes)

    def warning(self, message: str, *, every_s: float = 0.0, key: str = "", max_bytes: int = 0) -> bool:
        return self._log(LoggingSeverity.WARN, message, every_s, key, max_bytes)

    def error(self, message: str, *, every_s: float = 0.0, key: str = "", max_bytes: int = 0) -> bool:
        return self._log(LoggingSeverity.ERROR, message, every_s, key, max_bytes)

    def fatal(self, message: str, *, every_s: float = 0.0, key: str = "", max_bytes: int = 0) -> bool:
        return self._log(LoggingSeverity.FATAL, message, every_s, key, max_bytes)

    def _log(self, severity: LoggingSeverity, message: str, every_s: float, key: str, max_bytes: int) -> bool:
        """Emit ``message`` (False: throttled). Never raises: a failure to log must not become a crash."""
        try:
            if every_s > 0:
                if not key:
                    raise ValueError("a throttled log line needs a key")
                now = time.monotonic()
                with self._lock:
                    last = self._last.get(key)
                    if last is not None and now - last < every_s:
                        self._skipped[key] += 1
                        return False
                    self._last[key] = now
                    skipped = self._skipped.pop(key, 0)
                if skipped:
                    message = f"{message} ({skipped} more like this not logged in the last {every_s:g} s)"
            message = clip(message, max_bytes or self.max_bytes)
            message = message.encode("utf-8", "backslashreplace").decode("utf-8")  # lone surrogates
            # One call site per severity, no rclpy filters: see the class docstring.
            if severity == LoggingSeverity.DEBUG:
                self._logger.debug(message)
            elif severity == LoggingSeverity.INFO:
                self._logger.info(message)
            elif severity == LoggingSeverity.WARN:
                self._logger.warning(message)
            elif severity == LoggingSeverity.ERROR:
                self._logger.error(message)
            else:
                self._logger.fatal(message)
            return True
        except Exception as exc:  # logging must never kill a thread; say so on stderr instead
            self.failures += 1
            try:
                print(f"[bitmar] logging failed ({type(exc).__name__}: {clip(str(exc), 200)}): "
                      f"{clip(str(message), 500)}", file=sys.stderr, flush=True)
            except Exception:
                pass
            return False


class _StopSignals:
    """SIGINT/SIGTERM handlers that only ask the node to stop (checked by ``BitMarNode.spin``).
    Later signals are counted and said on stderr, never raised: a second SIGINT (the process group's,
    from ``ros2 launch``) or launch's SIGTERM must not interrupt the shutdown that saves the memory."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.ignored = 0  # signals after the first
        self._previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. main() called from a test): nothing to do
                pass

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
            return
        self.ignored += 1
        try:
            os.write(2, f"[bitmar] signal {signum} during shutdown: ignored, the memory state is being "
                        f"saved (SIGKILL ends the process at once)\n".encode())
        except OSError:
            pass

    def ignore_from_now(self) -> None:
        """SIG_IGN for both (Python's finalization resets handlers that are Python functions)."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                signal.signal(sig, signal.SIG_IGN)
            except ValueError:  # not the main thread
                pass

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            try:
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
            except (ValueError, TypeError):
                pass
        self._previous = {}


class BitMarNode(LifecycleNode):
    """The BitMar perception node, a managed (lifecycle) node (see module docstring and README)."""

    def __init__(self, **node_kwargs) -> None:
        super().__init__("bitmar", **node_kwargs)
        self._log = NodeLog(self.get_logger())
        self._cfg = self._declare_parameters()
        self._lock = threading.Condition()
        self._stopping = False
        self._active = False       # frames and captions let in, descriptions made (lifecycle 'active')
        self._configured = False   # model, store, interfaces and worker up ('inactive' or 'active')
        self._job_running = False  # the worker is inside a job (deactivate waits for it)
        self.finalized = False     # the lifecycle shutdown transition ran: spin() returns
        self.startup_error: StartupError | None = None  # why the last configure failed
        self.exit_code: int | None = None  # set when the node must exit (a crash loop): see spin()
        self._counters = collections.Counter()
        self._last_unexpected: tuple[float, str] | None = None  # (monotonic time, what) for /diagnostics
        self._crash_times: dict[str, collections.deque[float]] = {}
        self._lat_first = _Percentiles()
        self._lat_final = _Percentiles()
        self._lat_episode = _Percentiles()
        self._lat_caption = _Percentiles()
        self._lat_camera_cb = _Percentiles()  # reception → callback: how far the executor lags
        self._camera_lag = CameraLag(CAMERA_LAG_FLOOR_NS, CAMERA_LAG_CAP_NS)  # the same, for pairing
        self._lat_text_cb = _Percentiles()
        self._rejections: set[str] = set()
        self._rejections_bytes = 0
        self._rejections_full = False
        self._runtime: BitMarRuntime | None = None
        self._store: EpisodeStore | None = None
        self._memory: EpisodicMemoryService | None = None
        self._poses = PoseRing()           # recent poses of pose_topic (rebuilt at configure)
        self._tf_buffer = None             # tf2 buffer when pose_tf_frame is set
        self._tf_listener = None
        self._worker: threading.Thread | None = None
        self._query_pool: ThreadPoolExecutor | None = None
        self._queries_pending = 0
        self._diag_timer = None
        self._entities: list = []  # subscriptions, publishers, services of the configured node
        self._reset_pipeline()
        self.add_on_set_parameters_callback(self._guarded(
            "set_parameters", self.on_set_parameters,
            lambda why: SetParametersResult(successful=False, reason=f"internal error: {why}")))
        if self._cfg["autostart"]:
            if self.trigger_configure() != TransitionCallbackReturn.SUCCESS:
                raise self.startup_error or StartupError("configure failed (see the log)")
            if self.trigger_activate() != TransitionCallbackReturn.SUCCESS:
                self.shutdown()
                raise StartupError("activate failed (see the log)")
        else:
            self._log.info("unconfigured: waiting for the lifecycle transitions configure and activate "
                           f"({self.get_fully_qualified_name()}/change_state)")

    def _reset_pipeline(self) -> None:
        """Frames and captions in flight: empty (at construction and at each configure)."""
        self._latest: Frame | None = None  # descriptions take the newest frame only
        # The newest few frames handled, for captions whose callback runs after a frame received later.
        self._recent: RecentFrames[Frame] = RecentFrames(RECENT_FRAMES, RECENT_DENSE_NS, RECENT_SPARSE_GAP_NS)
        self._texts: CaptionQueue[Frame] = CaptionQueue(self._cfg["text_queue_size"])
        self._frame_seq = 0
        self._last_described_seq = -1
        self._last_scene: np.ndarray | None = None
        self._next_describe_ns = 0
        self._stream_id = 0

    # ------------------------------------------------------------------ lifecycle transitions
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Load the checkpoint and the store, create the interfaces, start the worker."""
        try:
            self._configure()
        except StartupError as exc:
            self.startup_error = exc
            self._log.error(f"configure failed: {exc}")
            self._release(save=False)
            return TransitionCallbackReturn.FAILURE
        self.startup_error = None
        return super().on_configure(state)

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        with self._lock:
            self._active = True
            self._next_describe_ns = 0
            self._lock.notify_all()
        self._log.info("active")
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._pause()
        self._log.info("inactive: frames and captions are counted, not stored, until activated")
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release()
        self._log.info("unconfigured: the store is closed")
        return super().on_cleanup(state)

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        """From any state: commit what was accepted, save the memory state, close the store; then
        ``spin`` returns and the process exits 0."""
        self.shutdown()
        self.finalized = True
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._log.error(f"a transition from {state.label} raised: releasing the model and the store")
        self._release()
        return TransitionCallbackReturn.SUCCESS  # back to 'unconfigured'

    def _pause(self) -> None:
        """Stop letting frames and captions in, then wait (bounded) until every caption already
        accepted is committed: a deactivate loses nothing that was acknowledged by a queue."""
        with self._lock:
            self._active = False
            self._lock.notify_all()
            limit = self._cfg["pair_tolerance_s"] + DRAIN_MARGIN_S
            drained = self._lock.wait_for(
                lambda: (not len(self._texts) and not self._job_running) or self._worker is None
                or not self._worker.is_alive(), timeout=limit)
        if not drained:
            self._log.error(f"{len(self._texts)} accepted captions not committed within {limit:g} s of deactivate; "
                            "they stay queued until the node is activated again")

    def _configure(self) -> None:
        self._reset_pipeline()
        self._runtime = self._load_runtime()
        self._store = self._open_store()
        self._memory = EpisodicMemoryService(self._runtime, self._store, retention=self._retention_policy())
        self._restore_memory()
        self._poses = PoseRing(PoseRingConfig(self._cfg["pose_ring_size"], self._cfg["pose_max_gap_s"],
                                              self._cfg["pose_max_extrapolate_s"]))
        self._tf_buffer = self._start_tf() if self._cfg["pose_tf_frame"] else None
        # Queries run here, off the executor thread (see on_query_memory).
        self._query_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bitmar-query")
        self._queries_pending = 0

        qos = QoSProfile(depth=self._cfg["qos_depth"], history=HistoryPolicy.KEEP_LAST,
                         reliability=(ReliabilityPolicy.BEST_EFFORT if self._cfg["qos_reliability"] == "best_effort"
                                      else ReliabilityPolicy.RELIABLE))
        if self._cfg["use_compressed"]:
            self._image_sub = self.create_subscription(
                CompressedImage, "image/compressed", self._guarded("image", self.on_compressed_image), qos)
        else:
            self._image_sub = self.create_subscription(Image, "image", self._guarded("image", self.on_image), qos)
        self._text_sub = self.create_subscription(String, "text", self._guarded("text", self.on_text), 50)
        # Lifecycle publishers: they publish only while active. /diagnostics is a plain one, so that
        # an inactive node still reports (what it counted while paused included).
        self._desc_pub = self.create_lifecycle_publisher(Description, "description_stream", 100)
        self._final_pub = self.create_lifecycle_publisher(String, "description", 10)
        self._episode_pub = self.create_lifecycle_publisher(Episode, "episodes", 10)
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        # Its own callback group: while a query waits for the query thread, the node's other
        # callbacks (one mutually exclusive group) run; reentrant, so that queries can queue.
        self._query_srv = self.create_service(QueryMemory, "~/query_memory", self._guarded_async(
            "query_memory", self.on_query_memory,
            lambda why: QueryMemory.Response(success=False, message=f"internal error: {why}")),
            callback_group=ReentrantCallbackGroup())
        self._save_srv = self.create_service(Trigger, "~/save_memory", self._guarded(
            "save_memory", self.on_save_memory, lambda why: Trigger.Response(success=False, message=f"internal error: {why}")))
        self._clear_srv = self.create_service(Trigger, "~/clear_memory", self._guarded(
            "clear_memory", self.on_clear_memory, lambda why: Trigger.Response(success=False, message=f"internal error: {why}")))
        self._forget_srv = self.create_service(Forget, "~/forget", self._guarded(
            "forget", self.on_forget, lambda why: Forget.Response(success=False, message=f"internal error: {why}")))
        self._goal_pub = self.create_lifecycle_publisher(PoseStamped, "~/goal_pose", 10)
        self._entities = [self._image_sub, self._text_sub, self._desc_pub, self._final_pub, self._episode_pub,
                          self._diag_pub, self._query_srv, self._save_srv, self._clear_srv, self._forget_srv,
                          self._goal_pub]
        if self._cfg["pose_topic"] and not self._cfg["pose_tf_frame"]:
            self._entities.append(self._subscribe_poses())
        self._diag_timer = None
        self._configured = True
        self._reset_diag_timer()

        # Daemon only so that a worker wedged in native code cannot keep the process alive after
        # shutdown() gave up joining it; shutdown() joins it in every normal case.
        self._stopping = False
        self._worker = threading.Thread(target=self._run_guarded, args=("worker", self._work_loop),
                                        name="bitmar-worker", daemon=True)
        self._worker.start()
        self._log.info(
            f"ready: checkpoint={self._checkpoint} backbone={self._runtime.backbone_name} "
            f"store={self._store.where} episodes={self._store.count()}")

    # ------------------------------------------------------------------ start-up
    def _declare_parameters(self) -> dict:
        cfg = {}
        problems = []
        for p in P.PARAMS:
            desc = ParameterDescriptor(description=p.description, read_only=False)
            if isinstance(p.default, bool):
                pass
            elif isinstance(p.default, int) and p.low is not None:
                desc.integer_range = [IntegerRange(from_value=int(p.low), to_value=int(p.high), step=1)]
            elif isinstance(p.default, float) and p.low is not None:
                desc.floating_point_range = [FloatingPointRange(from_value=float(p.low), to_value=float(p.high), step=0.0)]
            if p.choices:
                desc.additional_constraints = f"one of {list(p.choices)}"
            try:
                value = self.declare_parameter(p.name, p.default, desc).value
            except Exception as exc:  # wrong type in a params file
                problems.append(f"{p.name}: {exc}")
                continue
            why = P.check(p.name, value)
            if why:
                problems.append(why)
            cfg[p.name] = value
        if problems:
            raise StartupError("invalid parameters: " + "; ".join(problems), exit_code=2)
        return cfg

    def _load_runtime(self) -> BitMarRuntime:
        self._checkpoint = os.path.expanduser(self._cfg["checkpoint"]) or default_checkpoint()
        try:
            return BitMarRuntime.from_checkpoint(
                self._checkpoint, backbone=self._cfg["backbone"] or None,
                dinov2_weights_dir=self._cfg["dinov2_weights_dir"] or None,
                num_threads=self._cfg["num_threads"], seed=self._cfg["seed"])
        except (RuntimeLoadError, OSError, ValueError) as exc:
            raise StartupError(f"cannot load checkpoint '{self._checkpoint}': {exc}") from exc

    def _open_store(self) -> EpisodeStoreAPI:
        self._store_dir = os.path.expanduser(self._cfg["store_dir"])
        dsn = self._cfg["store_dsn"]  # set: the fleet's PostgreSQL store (bitmar_core/episodes/store_pg.py)
        robot_id = self._cfg["robot_id"] or self.get_fully_qualified_name()
        if dsn:
            from bitmar_core.episodes.store_pg import mask_dsn
        where = mask_dsn(dsn) if dsn else self._store_dir  # never the password
        try:
            store = EpisodicMemoryService.open_store(self._runtime, self._store_dir, store_dsn=dsn, robot_id=robot_id)
        except StoreError as exc:
            raise StartupError(f"cannot open episodic store '{where}': {exc} "
                               "(the store was left untouched)") from exc
        if dsn:  # episodes buffered while the database is unreachable are published once committed
            store.on_commit = self._on_buffered_commit
        return store

    def _retention_policy(self) -> RetentionPolicy:
        return RetentionPolicy(max_bytes=self._cfg["retention_max_bytes"], max_count=self._cfg["retention_max_episodes"],
                               max_age_s=float(self._cfg["retention_max_age_s"]),
                               thin_interval_s=float(self._cfg["retention_thin_interval_s"]),
                               thin_min_cosine=float(self._cfg["retention_thin_min_cosine"]))

    def _subscribe_poses(self) -> Subscription:
        """The pose source topic; its message type is imported only when used (nav_msgs for odometry)."""
        kind = self._cfg["pose_topic_type"]
        if kind == "odometry":
            from nav_msgs.msg import Odometry as msg_type
        elif kind == "pose_stamped":
            msg_type = PoseStamped
        else:
            from geometry_msgs.msg import PoseWithCovarianceStamped as msg_type
        # Odometry comes at 50+ Hz and each is tiny: a deep queue, so that a busy executor loses none.
        return self.create_subscription(msg_type, self._cfg["pose_topic"], self._guarded("pose", self.on_pose), 100)

    def _start_tf(self):
        """A tf2 buffer and listener for ``pose_tf_frame`` ← camera frame lookups."""
        try:
            import tf2_ros
        except ImportError as exc:
            raise StartupError(f"pose_tf_frame={self._cfg['pose_tf_frame']!r} needs tf2_ros, which is not importable "
                               f"here ({exc}); install ROS 2's tf2_ros, or use pose_topic instead", exit_code=2) from exc
        buffer = tf2_ros.Buffer()
        self._tf_listener = tf2_ros.TransformListener(buffer, self)
        return buffer

    def on_pose(self, msg) -> None:
        """A pose of the pose source: into the ring (any lifecycle state: a pose costs nothing)."""
        inner = msg.pose if isinstance(msg, PoseStamped) else msg.pose.pose  # Odometry, PoseWithCovarianceStamped
        if not msg.header.frame_id:
            self._reject("pose", "pose message without header.frame_id (expected the frame its pose is in, e.g. 'map')")
            return
        p, q = inner.position, inner.orientation
        try:
            pose = Pose(msg.header.frame_id, (p.x, p.y, p.z), (q.x, q.y, q.z, q.w))
            self._poses.add(_stamp_ns(msg.header.stamp), pose)
        except PoseError as exc:
            self._reject("pose", str(exc))
            return
        with self._lock:
            self._counters["poses_received"] += 1

    def _pose_at(self, frame: "Frame") -> Pose | None:
        """Where the camera was at the frame's stamp: tf2, or the pose ring (None without a source)."""
        if self._tf_buffer is not None:
            from rclpy.duration import Duration
            from rclpy.time import Time
            target = self._cfg["pose_tf_frame"]
            try:
                t = self._tf_buffer.lookup_transform(target, frame.header.frame_id, Time(nanoseconds=frame.stamp_ns),
                                                     timeout=Duration(seconds=0.0))
                tr, rot = t.transform.translation, t.transform.rotation
                pose = Pose(target, (tr.x, tr.y, tr.z), (rot.x, rot.y, rot.z, rot.w))
            except Exception as exc:  # tf2's lookup, connectivity and extrapolation errors, a degenerate rotation
                self._counters["pose_missing_tf"] += 1
                self._log.warning(f"no pose from tf2 for frame '{frame.header.frame_id}': {clip(str(exc), 200)}",
                                  every_s=10.0, key="pose_tf")
                return None
        elif self._cfg["pose_topic"]:
            if len(self._poses):  # a live source: its next pose brackets the stamp soon (no source: no wait)
                self._poses.wait_past(frame.stamp_ns, self._cfg["pose_max_gap_s"])
            pose, why = self._poses.at(frame.stamp_ns)
            if pose is None:
                self._counters[f"pose_missing_{why}"] += 1
                return None
        else:
            return None
        self._counters["episodes_posed"] += 1
        return pose

    def _restore_memory(self) -> None:
        try:
            restored = self._memory.restore()
        except EpisodicError as exc:  # unreadable, non-finite or misfit: refuse to start, like a garbled store
            raise StartupError(f"{exc} (the store was left untouched)") from exc
        if restored:
            self._log.info(f"restored episodic memory ({self._runtime.memory_writes} writes)")

    # ------------------------------------------------------------------ callbacks (never block on the model)
    def on_image(self, msg: Image, info: MessageInfo) -> None:
        self._accept_frame(msg, _received_ns(info), image_to_rgb8)

    def on_compressed_image(self, msg: CompressedImage, info: MessageInfo) -> None:
        self._accept_frame(msg, _received_ns(info), compressed_to_rgb8)

    def _inactive(self, what: str) -> bool:
        """True (and counted in ``<what>_inactive``) when the node is configured but not active."""
        if self._active:
            return False
        with self._lock:
            self._counters[f"{what}_inactive"] += 1
        self._log.warning(f"{what} received while inactive: not stored (counted in {what}_inactive; activate "
                          "the node to store frames and captions)", every_s=5.0, key=f"{what}_inactive")
        return True

    def _accept_frame(self, msg, recv_ns: int, convert) -> None:
        lag_ns = time.time_ns() - recv_ns
        self._lat_camera_cb.add(lag_ns / 1e9)
        if self._inactive("frames"):
            return
        try:
            rgb = convert(msg)
        except ImageConversionError as exc:
            self._reject("frame", str(exc))
            return
        small = model_input(rgb, self._runtime.input_size)  # the path query images take too
        t = self._cfg["thumbnail_size"]
        scale = t / max(rgb.shape[:2])
        thumb = cv2.resize(rgb, (max(1, round(rgb.shape[1] * scale)), max(1, round(rgb.shape[0] * scale))),
                           interpolation=cv2.INTER_AREA) if scale < 1 else np.array(rgb)
        stamp_ns = _stamp_ns(msg.header.stamp)
        if stamp_ns <= 0:  # unset or negative: the node's clock stands in (module docstring)
            given = f"sec={msg.header.stamp.sec} nanosec={msg.header.stamp.nanosec}"
            now = self.get_clock().now()
            msg.header.stamp = now.to_msg()
            stamp_ns = now.nanoseconds
            self._counters["frame_stamp_replaced"] += 1
            self._log.warning(f"frame header stamp {given} is not positive: the frame is stamped with the node's "
                              f"clock ({stamp_ns} ns) instead (counted in frame_stamp_replaced)",
                              every_s=10.0, key="stamp_replaced")
        with self._lock:
            self._frame_seq += 1
            if self._latest is not None and self._latest.seq > self._last_described_seq:
                self._counters["frames_skipped"] += 1  # superseded before being described: latest-frame policy
            self._latest = Frame(self._frame_seq, stamp_ns, recv_ns, msg.header, small, thumb)
            self._recent.add(self._latest)
            self._texts.on_frame(self._latest)
            self._camera_lag.add(lag_ns)
            self._counters["frames_received"] += 1
            self._lock.notify_all()

    def on_text(self, msg: String, info: MessageInfo) -> None:
        t_ns = _received_ns(info)
        self._lat_text_cb.add((time.time_ns() - t_ns) / 1e9)
        if self._inactive("text"):
            return
        text = msg.data
        n_bytes = len(text.encode("utf-8", errors="surrogatepass"))
        if not text.strip():
            self._reject("text", "empty caption (expected non-blank text)")
            return
        if n_bytes > self._cfg["max_text_bytes"]:
            self._reject("text", f"caption of {n_bytes} bytes exceeds max_text_bytes={self._cfg['max_text_bytes']}")
            return
        with self._lock:
            # Paired with the frames around its arrival now, not when the worker gets to it.
            dropped = self._texts.add(text, t_ns, self._recent)
            if dropped is not None:
                self._counters["text_dropped"] += 1
            self._counters["text_received"] += 1
            self._lock.notify_all()
        if dropped is not None:
            self._log.warning(f"caption queue full (text_queue_size={self._texts.maxlen}): dropped the oldest "
                              f"caption {clip(dropped.text, 80)!r} (counted in text_dropped)",
                              every_s=5.0, key="text_dropped")

    def _reject(self, what: str, reason: str) -> None:
        """Count a rejected input; log each distinct reason once (then only count), so a flood of bad
        input cannot flood the log. The reason is clipped to MAX_REASON_BYTES first (it may quote
        megabytes of hostile input), and the set of reasons is bounded in count and bytes."""
        reason = clip(reason, MAX_REASON_BYTES)
        key = f"{what}:{reason}"
        size = len(key.encode("utf-8", "backslashreplace"))
        with self._lock:
            self._counters[f"{what}_rejected"] += 1
            new = key not in self._rejections
            fits = len(self._rejections) < MAX_LOGGED_REASONS and self._rejections_bytes + size <= MAX_REASONS_BYTES
            if new and fits:
                self._rejections.add(key)
                self._rejections_bytes += size
            first_full = new and not fits and not self._rejections_full
            if first_full:
                self._rejections_full = True
        if new and fits:
            self._log.warning(f"rejected {what}: {reason}")
        elif first_full:
            self._log.warning(f"{len(self._rejections)} distinct rejection reasons ({self._rejections_bytes} bytes) "
                              "logged; further new reasons are only counted (see /diagnostics *_rejected)")

    # ------------------------------------------------------------------ guards (no silent death)
    def _report_unexpected(self, where: str, exc: BaseException, counter: str) -> None:
        """Log an unexpected exception with its traceback, count it, and make /diagnostics say ERROR."""
        what = f"{type(exc).__name__} in {where}: {clip(str(exc), 200)}"
        with self._lock:
            self._counters[counter] += 1
            self._last_unexpected = (time.monotonic(), what)
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip()
        self._log.error(f"unexpected {what} (counted in {counter})\n{tb}", max_bytes=MAX_TRACEBACK_BYTES)

    def _guarded_async(self, name: str, callback: Callable, fallback: Callable[[str], object]) -> Callable:
        """``_guarded`` for a coroutine callback (rclpy awaits it on the executor thread)."""
        @functools.wraps(callback)
        async def run(*args, **kwargs):
            try:
                return await callback(*args, **kwargs)
            except Exception as exc:
                self._report_unexpected(f"callback {name}", exc, "callback_errors")
                return fallback(clip(f"{type(exc).__name__}: {exc}", 200))
        return run

    def _guarded(self, name: str, callback: Callable, fallback: Callable[[str], object] | None = None) -> Callable:
        """``callback`` for the executor, under the guard: an exception is reported (see
        ``_report_unexpected``) instead of propagating out of ``spin`` and ending the process; a
        service or parameter callback then answers ``fallback(reason)``."""
        @functools.wraps(callback)  # keeps the signature rclpy inspects (message info or not)
        def run(*args, **kwargs):
            try:
                return callback(*args, **kwargs)
            except Exception as exc:
                self._report_unexpected(f"callback {name}", exc, "callback_errors")
                return fallback(clip(f"{type(exc).__name__}: {exc}", 200)) if fallback is not None else None
        return run

    def _run_guarded(self, name: str, loop: Callable[[], None]) -> None:
        """Run a thread's ``loop`` until it returns. An exception is reported and the loop restarted
        after a back-off (0.05 s, doubling to 5 s); ``CRASH_LOOP_COUNT`` crashes within
        ``CRASH_LOOP_WINDOW_S`` make the node exit with ``EXIT_CRASH_LOOP`` instead (see module docstring)."""
        backoff = 0.05
        while True:
            started = time.monotonic()
            try:
                loop()
                return
            except BaseException as exc:  # noqa: BLE001 - nothing may end this thread unseen
                self._report_unexpected(f"the {name} thread", exc, "thread_crashes")
                if time.monotonic() - started > CRASH_LOOP_WINDOW_S:
                    backoff = 0.05
                if self._crash_loop(name):
                    return
                with self._lock:
                    if self._lock.wait_for(lambda: self._stopping, timeout=backoff):
                        return
                backoff = min(5.0, 2 * backoff)
                self._counters["thread_restarts"] += 1
                self._log.warning(f"restarting the {name} thread")

    def _crash_loop(self, name: str) -> bool:
        """Record a crash of ``name``; True (and an exit requested) when it crashes in a loop."""
        times = self._crash_times.setdefault(name, collections.deque(maxlen=CRASH_LOOP_COUNT))
        now = time.monotonic()
        times.append(now)
        if len(times) < CRASH_LOOP_COUNT or now - times[0] > CRASH_LOOP_WINDOW_S:
            return False
        self.request_exit(EXIT_CRASH_LOOP, f"the {name} thread crashed {len(times)} times within "
                                           f"{CRASH_LOOP_WINDOW_S:g} s")
        return True

    def request_exit(self, code: int, why: str) -> None:
        """Ask ``spin`` to return ``code`` (the process then shuts down cleanly and exits with it)."""
        with self._lock:
            if self.exit_code is None:
                self.exit_code = code
        self._log.fatal(f"{why}: shutting down with exit code {code} (for respawn to restart the node)")

    def spin(self, executor, stop: "_StopSignals | None" = None) -> int:
        """Spin ``executor`` until a stop signal, an exit request, the lifecycle shutdown transition or
        rclpy shutdown; the exit code.
        An exception escaping the executor is reported and spinning goes on (crash loops: exit)."""
        while (self.context.ok() and self.exit_code is None and not self.finalized
               and not (stop is not None and stop.requested)):
            try:
                executor.spin_once(timeout_sec=0.25)
            except ExternalShutdownException:
                break
            except Exception as exc:
                self._report_unexpected("the executor thread", exc, "thread_crashes")
                self._crash_loop("executor")
        return self.exit_code or 0

    # ------------------------------------------------------------------ worker
    def _work_loop(self) -> None:
        while True:
            with self._lock:
                job = None
                while job is None and not self._stopping:
                    job = self._next_job()
                    if job is None:
                        self._lock.wait(timeout=self._idle_wait_s())
                if self._stopping:
                    return
                self._job_running = True
            try:
                job()
            except Exception as exc:  # one failed job: report it and go on with the next
                self._report_unexpected("a worker job", exc, "worker_errors")
            finally:
                with self._lock:
                    self._job_running = False
                    self._lock.notify_all()  # a deactivate may be waiting for the queue to drain

    def _idle_wait_s(self) -> float:
        """How long the idle worker sleeps (new frames and captions wake it earlier). Never 0: with a
        description due but no new frame to describe, a zero wait spun this thread and held the GIL,
        and a query answered meanwhile took seconds instead of milliseconds."""
        rate = self._cfg["describe_rate_hz"]
        fresh = self._latest is not None and self._latest.seq != self._last_described_seq
        if rate <= 0 or not fresh:
            return 0.1
        return max(0.001, min(0.1, (self._next_describe_ns - time.monotonic_ns()) / 1e9))

    def _next_job(self):
        """Pick the next piece of work (called with the lock held). Captions come first: they are
        what the store must never lose; descriptions take the latest frame only."""
        tol_ns = int(self._cfg["pair_tolerance_s"] * 1e9)
        while (ready := self._texts.pop_ready(time.time_ns(), tol_ns, self._camera_lag.allowance_ns())) is not None:
            caption, frame = ready
            if frame is not None:
                return lambda: self._store_episode(caption.text, frame, "caption", received_ns=caption.t_ns)
            self._reject("text", f"no camera frame within pair_tolerance_s={self._cfg['pair_tolerance_s']} "
                                 "of the caption")
            self._counters["text_unpaired"] += 1
            self._log.warning(f"unpaired caption {clip(caption.text, 40)!r}: nearest frames "
                              f"{_gap_s(caption.before, caption.t_ns)} before, "
                              f"{_gap_s(caption.after, caption.t_ns)} after (counted in text_unpaired)",
                              every_s=1.0, key="text_unpaired")
        frame = self._latest
        if not self._active or frame is None or frame.seq == self._last_described_seq:
            return None  # inactive: the captions accepted before are committed, nothing is described
        now = time.monotonic_ns()
        rate = self._cfg["describe_rate_hz"]
        due = rate > 0 and now >= self._next_describe_ns
        if due:
            self._next_describe_ns = now + int(1e9 / rate)
            self._last_described_seq = frame.seq
            return lambda: self._describe(frame)
        if self._cfg["scene_change_threshold"] > 0:
            self._last_described_seq = frame.seq
            return lambda: self._describe_if_changed(frame)
        return None

    def _store_episode(self, caption: str, frame: Frame, source: str, code=None, received_ns: int = 0) -> None:
        t0 = time.monotonic()
        pose = self._pose_at(frame)
        try:  # memory write and store commit together; a failed commit undoes the write
            ep_id = self._memory.record(caption, frame.stamp_ns, rgb=frame.rgb, code=code, source=source,
                                        thumbnail_rgb=frame.thumbnail, thumbnail_size=self._cfg["thumbnail_size"],
                                        token=(caption, source, frame.header, pose), pose=pose)
        except StoreError as exc:
            self._counters["store_errors"] += 1
            self._log.error(f"episode not stored ({exc}); memory and store unchanged")
            return
        self._counters[f"episodes_{source}"] += 1
        self._lat_episode.add(time.monotonic() - t0)
        if received_ns:
            self._lat_caption.add((time.time_ns() - received_ns) / 1e9)  # waiting in the queue included
        if ep_id is None:  # a fleet store's database is unreachable: buffered, acknowledged once committed
            self._counters["episodes_buffered"] += 1
            return
        self._publish_episode(ep_id, caption, source, frame.header, pose)

    def _publish_episode(self, ep_id: int, caption: str, source: str, header, pose: Pose | None = None) -> None:
        # The acknowledgement line is what the reliability tests hold the store to.
        self._log.info(f"episode {ep_id} committed [{source}]: {caption[:80]!r}")
        msg = Episode(id=ep_id, caption=caption, source=source, score=1.0, robot_id=self._store.robot_id)
        msg.stamp = header.stamp
        msg.thumbnail.header = header
        msg.thumbnail.format = "jpeg"
        _set_pose(msg, pose, header.stamp)
        self._episode_pub.publish(msg)

    def _on_buffered_commit(self, ep_id: int, token) -> None:
        """A buffered episode reached the fleet database (the store's flush thread calls this)."""
        caption, source, header, pose = token
        self._publish_episode(ep_id, caption, source, header, pose)

    def _describe_if_changed(self, frame: Frame) -> None:
        code = self._runtime.embed_frame(frame.rgb)
        scene = code.scene
        if self._last_scene is not None and 1.0 - float(scene @ self._last_scene) <= self._cfg["scene_change_threshold"]:
            return
        self._describe(frame, code)

    def _describe(self, frame: Frame, code=None) -> None:
        if code is None:
            code = self._runtime.embed_frame(frame.rgb)
        self._last_scene = code.scene
        self._stream_id += 1
        text, index, first = "", 0, None
        for token_id, delta in self._runtime.describe(code, max_new_tokens=self._cfg["max_new_tokens"],
                                                       temperature=self._cfg["temperature"], top_k=self._cfg["top_k"],
                                                       continue_session=self._cfg["continue_session"]):
            text += delta
            self._desc_pub.publish(Description(header=frame.header, stream_id=self._stream_id, token_index=index,
                                               token_id=int(token_id), text_delta=delta, text=text, is_final=False))
            if first is None:
                first = time.time_ns()
                self._lat_first.add((first - frame.recv_ns) / 1e9)
            index += 1
        self._desc_pub.publish(Description(header=frame.header, stream_id=self._stream_id, token_index=index,
                                           token_id=-1, text_delta="", text=text, is_final=True))
        self._final_pub.publish(String(data=text))
        self._lat_final.add((time.time_ns() - frame.recv_ns) / 1e9)
        self._counters["descriptions"] += 1
        if self._cfg["store_descriptions"] and text.strip():
            self._store_episode(text.strip(), frame, "description", code)

    # ------------------------------------------------------------------ services
    async def on_query_memory(self, req: QueryMemory.Request, resp: QueryMemory.Response) -> QueryMemory.Response:
        """The query service (registered under the guard: a bug answers success=False). Checked
        here; retrieved and answered on the query thread while this coroutine waits, so the
        executor goes on handling camera frames and captions meanwhile."""
        self._counters["queries"] += 1
        problem = self._check_query(req)
        if problem is None and self._queries_pending >= MAX_PENDING_QUERIES:
            problem = f"busy: {self._queries_pending} queries are waiting (at most {MAX_PENDING_QUERIES})"
        if problem:
            self._counters["queries_rejected"] += 1
            resp.success, resp.message = False, clip(problem, MAX_REPLY_BYTES)
            self._log.warning(f"rejected query: {clip(problem, MAX_REASON_BYTES)}", every_s=1.0, key="query_rejected")
            return resp
        done = Future(executor=self.executor)
        done.add_done_callback(lambda _: None)  # completing it from the query thread wakes the executor
        self._queries_pending += 1

        def work() -> None:
            try:
                done.set_result(self._answer_query(req, resp))
            except BaseException as exc:  # noqa: BLE001 - reported by the guard on the executor thread
                done.set_exception(exc)

        try:
            self._query_pool.submit(work)
            return await done
        finally:
            self._queries_pending -= 1

    def _answer_query(self, req: QueryMemory.Request, resp: QueryMemory.Response) -> QueryMemory.Response:
        """Retrieval (and the answer) of a checked query; runs on the query thread."""
        t0 = time.monotonic()
        image = None
        if len(req.image.data):
            try:
                image = image_to_rgb8(req.image)
            except ImageConversionError as exc:
                self._counters["queries_rejected"] += 1
                resp.success, resp.message = False, f"query image: {clip(str(exc), MAX_REASON_BYTES)}"
                return resp
        code = self._memory.embed_image(image) if image is not None else None  # camera frames' resize
        window = dict(k=int(req.k), start_ns=_stamp_ns(req.start) or None, end_ns=_stamp_ns(req.end) or None,
                      robot_scope=req.robot_scope or None)
        if req.near_frame:
            window["near"] = SpatialFilter(req.near_frame, float(req.near.x), float(req.near.y), float(req.radius_m))
        try:
            if req.generate_answer:
                answer = self._memory.answer(req.text or None, code=code, max_new_tokens=self._cfg["answer_max_new_tokens"],
                                             **window)
                hits, message = answer.hits, answer.message
                resp.answer, resp.answer_episode_ids = answer.text, answer.episode_ids
            else:
                result = self._memory.query(req.text or None, code=code, **window)
                hits, message = result.hits, result.message
        except StoreError as exc:
            resp.success, resp.message = False, clip(f"store: {exc}", MAX_REPLY_BYTES)
            return resp
        for h in hits:
            m = Episode(id=h.episode.id, caption=h.episode.caption, source=h.episode.source, score=h.score,
                        matched_by=h.matched_by, lexical_score=h.lexical_score, lexical_rank=h.lexical_rank,
                        embedding_score=h.embedding_score, embedding_rank=h.embedding_rank,
                        robot_id=h.episode.robot_id)
            m.stamp.sec, m.stamp.nanosec = divmod(h.episode.stamp_ns, 1_000_000_000)
            m.thumbnail.format = "jpeg"
            m.thumbnail.header.stamp = m.stamp
            m.thumbnail.data = h.episode.thumbnail_jpeg
            _set_pose(m, h.episode.pose, m.stamp)
            resp.episodes.append(m)
        if req.publish_goal and resp.episodes and resp.episodes[0].has_pose and self._active:
            goal = PoseStamped(pose=resp.episodes[0].pose.pose)
            goal.header.frame_id = resp.episodes[0].pose.header.frame_id
            goal.header.stamp = self.get_clock().now().to_msg()  # a goal for now, at the place it was seen
            self._goal_pub.publish(goal)
            resp.goal_published = True
            self._counters["goals_published"] += 1
        resp.success = True  # no episode in the window is an answer too; the message says so
        resp.message = clip(f"{message}; {1e3 * (time.monotonic() - t0):.1f} ms in all", MAX_REPLY_BYTES)
        return resp

    def _check_query(self, req: QueryMemory.Request) -> str | None:
        if not 1 <= req.k <= self._cfg["max_query_k"]:
            return f"k must be in [1, {self._cfg['max_query_k']}], got {req.k}"
        if len(req.text) > self._cfg["max_query_chars"]:
            return f"text of {len(req.text)} characters exceeds max_query_chars={self._cfg['max_query_chars']}"
        if not req.text.strip() and not len(req.image.data):
            return "empty query: give text, an image, or both"
        start, end = _stamp_ns(req.start), _stamp_ns(req.end)
        if start and end and start > end:
            return f"time window inverted: start {start} ns > end {end} ns"
        if req.near_frame:
            near = (req.near.x, req.near.y, req.radius_m)
            if not all(np.isfinite(near)) or req.radius_m <= 0:
                return (f"spatial filter: expected finite near.x, near.y and radius_m > 0 metres with near_frame "
                        f"{clip(req.near_frame, 80)!r}, got near=({req.near.x}, {req.near.y}), radius_m={req.radius_m}")
        elif req.radius_m:
            return f"radius_m={req.radius_m} without near_frame: name the frame of the point 'near' (e.g. 'map')"
        return None

    def on_forget(self, req: Forget.Request, resp: Forget.Response) -> Forget.Response:
        """Delete chosen episodes (``EpisodicMemoryService.forget``); a request naming nothing is refused."""
        start, end = _stamp_ns(req.start) or None, _stamp_ns(req.end) or None
        try:
            gone = self._memory.forget(ids=list(req.ids) or None, start_ns=start, end_ns=end,
                                       caption_contains=req.caption_contains or None)
        except StoreError as exc:
            resp.success, resp.message = False, clip(f"forget: {exc}", MAX_REPLY_BYTES)
            return resp
        resp.success, resp.forgotten_ids = True, gone
        resp.message = (f"forgot {len(gone)} episodes; {self._store.count()} remain (the memory matrix keeps the "
                        "superposition of their writes)")
        self._log.info(resp.message)
        return resp

    def on_save_memory(self, req: Trigger.Request, resp: Trigger.Response) -> Trigger.Response:
        try:
            count = self._memory.save()
        except StoreError as exc:
            resp.success, resp.message = False, clip(str(exc), MAX_REPLY_BYTES)
            return resp
        resp.success, resp.message = True, f"saved {count} episodes and the memory state"
        return resp

    def on_clear_memory(self, req: Trigger.Request, resp: Trigger.Response) -> Trigger.Response:
        try:
            self._memory.clear()  # the model's memory and the stored episodes, together
        except StoreError as exc:
            resp.success, resp.message = False, clip(str(exc), MAX_REPLY_BYTES)
            return resp
        resp.success, resp.message = True, "episodic memory cleared"
        self._log.info("episodic memory cleared")
        return resp

    # ------------------------------------------------------------------ parameters and diagnostics
    def on_set_parameters(self, parameters: list[Parameter]) -> SetParametersResult:
        for p in parameters:
            if p.name not in P.BY_NAME:
                continue
            if not P.BY_NAME[p.name].runtime:
                return SetParametersResult(successful=False,
                                           reason=f"{p.name} cannot change while running (restart the node)")
            why = P.check(p.name, p.value)
            if why:
                return SetParametersResult(successful=False, reason=why)
        with self._lock:
            for p in parameters:
                if p.name in P.BY_NAME:
                    self._cfg[p.name] = p.value
            self._next_describe_ns = 0
            self._lock.notify_all()
        if self._configured and any(p.name == "diagnostics_rate_hz" for p in parameters):
            self._reset_diag_timer()
        if self._configured and any(p.name.startswith("retention_") for p in parameters):
            self._memory.retention = self._retention_policy()
        if self._configured and any(p.name.startswith("pose_max_") for p in parameters):
            self._poses.config = PoseRingConfig(self._cfg["pose_ring_size"], self._cfg["pose_max_gap_s"],
                                                self._cfg["pose_max_extrapolate_s"])
        return SetParametersResult(successful=True)

    def _reset_diag_timer(self) -> None:
        if self._diag_timer is not None:
            self.destroy_timer(self._diag_timer)
            self._diag_timer = None
        if self._cfg["diagnostics_rate_hz"] > 0:
            self._diag_timer = self.create_timer(1.0 / self._cfg["diagnostics_rate_hz"],
                                                 self._guarded("diagnostics", self.on_diagnostics_timer))

    def stats(self) -> dict[str, float]:
        with self._lock:
            s = {k: float(v) for k, v in self._counters.items()}
            s["text_queue"] = float(len(self._texts))
            s["rejection_reasons"] = float(len(self._rejections))
            s["rejection_reasons_bytes"] = float(self._rejections_bytes)
        if self._log.failures:
            s["log_failures"] = float(self._log.failures)
        store, runtime = self._store, self._runtime
        if store is not None and runtime is not None:
            s["episodes_stored"] = float(store.count())
            s["memory_writes"] = float(runtime.memory_writes)
            if hasattr(store, "buffer_status"):  # a fleet store: episodes waiting for the database
                s.update(store.buffer_status())
            if isinstance(store, EpisodeStore):  # the fleet store's size is the database's
                try:
                    s["store_bytes"] = float(store.bytes_used())
                except StoreError:
                    pass
        if self._memory is not None:
            s.update({k: float(v) for k, v in self._memory.retention_totals.items()})
        for name, pct in (("first_token", self._lat_first), ("final", self._lat_final), ("episode", self._lat_episode),
                          ("caption_to_commit", self._lat_caption), ("camera_callback", self._lat_camera_cb),
                          ("text_callback", self._lat_text_cb)):
            s[f"{name}_latency_p50_s"] = pct.get(50)
            s[f"{name}_latency_p95_s"] = pct.get(95)
            s[f"{name}_latency_max_s"] = pct.get(100)
        try:
            import psutil
            s["rss_mb"] = psutil.Process().memory_info().rss / 2**20
        except ImportError:
            pass
        return s

    def on_diagnostics_timer(self) -> None:
        arr = DiagnosticArray(status=[self.diagnostic_status()])
        arr.header.stamp = self.get_clock().now().to_msg()
        self._diag_pub.publish(arr)

    def diagnostic_status(self) -> DiagnosticStatus:
        """The node's status for /diagnostics: ERROR for ERROR_HOLD_S after an unexpected exception,
        WARN once errors occurred, else OK; the values are ``stats()``."""
        s = self.stats()
        status = DiagnosticStatus(name=f"{self.get_fully_qualified_name()}: bitmar", hardware_id="bitmar",
                                  level=DiagnosticStatus.OK, message="running")
        last = self._last_unexpected
        if last is not None and time.monotonic() - last[0] <= ERROR_HOLD_S:
            status.level = DiagnosticStatus.ERROR
            status.message = clip(f"unexpected {last[1]} {time.monotonic() - last[0]:.0f} s ago (see log)", 400)
        elif any(s.get(k, 0) for k in ("worker_errors", "callback_errors", "thread_crashes", "store_errors", "log_failures")):
            status.level, status.message = DiagnosticStatus.WARN, "errors occurred (see log)"
        status.values = [KeyValue(key=k, value=f"{v:.6g}") for k, v in sorted(s.items())]
        return status

    def worker_alive(self) -> bool:
        return self._worker is not None and self._worker.is_alive()

    def shutdown(self) -> None:
        """Commit the captions already accepted (when active), stop the worker (it finishes its job:
        the ROS context is still up), persist the memory state (reads changed its usage) and close
        the store. Safe in any state and more than once."""
        if self._active:
            self._pause()
        self._release()

    def _release(self, save: bool = True) -> None:
        """Undo ``_configure`` (whatever part of it ran): stop the worker and the query thread, save
        the memory state and close the store, destroy the interfaces."""
        with self._lock:
            self._active = False
            self._stopping = True
            self._lock.notify_all()
        if self._worker is not None:
            self._worker.join(timeout=30)
            if self._worker.is_alive():
                self._log.error("the worker did not stop within 30 s; closing the store under it")
            else:
                self._worker = None
        if self._query_pool is not None:
            self._query_pool.shutdown(wait=True, cancel_futures=True)
            self._query_pool = None
        if self._memory is not None:
            try:
                self._memory.close(save=save)
                if save:
                    self._log.info(f"memory state saved ({self._runtime.memory_writes} writes); store closed")
            except StoreError as exc:
                self._log.error(f"memory state not saved at shutdown: {exc}")
                self._store.close()
        elif self._store is not None:
            self._store.close()
        self._memory = self._store = None
        if self._diag_timer is not None:
            self.destroy_timer(self._diag_timer)
            self._diag_timer = None
        for entity in self._entities:
            if isinstance(entity, LifecyclePublisher):
                self.destroy_lifecycle_publisher(entity)
            elif isinstance(entity, Service):
                self.destroy_service(entity)
            elif isinstance(entity, Subscription):
                self.destroy_subscription(entity)
            else:
                self.destroy_publisher(entity)
        self._entities = []
        if self._tf_listener is not None:  # its subscriptions to /tf and /tf_static
            self._tf_listener.unregister()
            self._tf_listener = None
        self._tf_buffer = None
        self._runtime = None
        self._configured = False


def main(args=None) -> None:
    # Our handlers, not rclpy's: rclpy's shut the context down at once from its signal thread,
    # while the worker was still publishing ("publisher's context is invalid").
    stop = _StopSignals()
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    try:
        node = BitMarNode()
    except StartupError as exc:
        print(f"[bitmar_node] error: {exc}", file=sys.stderr, flush=True)
        rclpy.try_shutdown()
        sys.exit(exc.exit_code)
    # One executor thread is enough (callbacks only convert and enqueue; the model runs in the
    # worker) and is what keeps the worker fed: rclpy's MultiThreadedExecutor re-polls while a
    # ready subscription's group is busy, and under a 30 Hz camera its loop held the GIL in 71% of the
    # samples where a thread held it (py-spy --gil), leaving the model thread 17%.
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    code = 0
    try:
        code = node.spin(executor, stop)
    finally:
        # Order matters: the worker stops while the context is still valid, the store closes,
        # and rclpy.shutdown() last also joins rclpy's signal thread.
        node.shutdown()
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
        # Everything is saved: further signals are ignored until the process has exited. rclpy's
        # shutdown and Python's finalization both put the default handlers back, and a late second
        # SIGINT then raised KeyboardInterrupt (exit -2), a late SIGTERM killed the process (-15).
        stop.ignore_from_now()
    if node.worker_alive():  # wedged in native code: finalizing Python under it could abort the process
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code or 1)
    sys.exit(code)


if __name__ == "__main__":
    main()
