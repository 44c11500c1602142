"""The node's parameters: one table with each name, default, description, range and whether it may
change while the node runs. Model sizes are not here: they come from the checkpoint's config."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Param:
    name: str
    default: Any
    description: str
    low: float | None = None       # inclusive range for numbers
    high: float | None = None
    choices: tuple[str, ...] = ()  # allowed values for strings
    runtime: bool = False          # may change while running (the others need a restart)


PARAMS: tuple[Param, ...] = (
    Param("autostart", True, "configure and activate at start-up; false: a managed node that waits in "
          "'unconfigured' for lifecycle transitions (from a lifecycle manager)"),
    Param("checkpoint", "", "BitMar checkpoint (.safetensors); empty = the bundled default"),
    Param("backbone", "", "vision backbone override (efficientnet_lite0, dinov2_vitb14, dinov2_vits14); "
          "empty = the checkpoint's", choices=("", "efficientnet_lite0", "dinov2_vitb14", "dinov2_vits14")),
    Param("dinov2_weights_dir", "", "local directory with DINOv2 weights (from_pretrained); empty = HF cache or random init"),
    Param("store_dir", "~/.bitmar/store", "directory of the persistent episodic store (created 0700)"),
    Param("store_dsn", "", "PostgreSQL + pgvector DSN of a fleet's shared episodic store (e.g. "
          "'host=db.example dbname=fleet user=robot sslmode=require'; password from PGPASSWORD or a "
          "passfile); empty = SQLite under store_dir"),
    Param("robot_id", "", "the robot each episode is recorded as in a fleet store; empty = the node's "
          "fully qualified name"),
    Param("use_compressed", False, "subscribe to sensor_msgs/CompressedImage on 'image/compressed' instead of Image on 'image'"),
    Param("qos_reliability", "reliable", "camera subscription reliability", choices=("reliable", "best_effort")),
    Param("qos_depth", 5, "camera subscription queue depth", 1, 100),
    Param("text_queue_size", 64, "bound of captions waiting for the model (each pinned to its frames at arrival); more are dropped and counted", 1, 10000),
    Param("pair_tolerance_s", 1.0, "largest time between a caption and its frame", 0.0, 60.0, runtime=True),
    Param("max_text_bytes", 4096, "captions longer than this (UTF-8 bytes) are rejected", 1, 65536),
    Param("describe_rate_hz", 1.0, "descriptions per second of the latest frame (0 = only on scene change)",
          0.0, 30.0, runtime=True),
    Param("scene_change_threshold", 0.0, "also describe when 1 - cos(scene, last described scene) exceeds this "
          "(0 = off)", 0.0, 2.0, runtime=True),
    Param("max_new_tokens", 64, "longest description in tokens (test captions: median 30, p90 56)", 1, 256, runtime=True),
    Param("continue_session", True, "narrate in one continuing decoder stream (the paper's attention sinks + "
          "window); off: a fresh stream for every description", runtime=True),
    Param("temperature", 0.0, "sampling temperature (0 = greedy)", 0.0, 5.0, runtime=True),
    Param("top_k", 0, "top-k sampling (0 = all tokens)", 0, 50257, runtime=True),
    Param("store_descriptions", False, "also store generated descriptions as episodes", runtime=True),
    Param("max_query_k", 50, "largest k the query service accepts", 1, 1000),
    Param("max_query_chars", 2000, "longest query text the service accepts", 1, 65536),
    Param("answer_max_new_tokens", 64, "longest generated answer", 1, 256, runtime=True),
    Param("thumbnail_size", 96, "longest side of stored JPEG thumbnails in pixels", 16, 512),
    Param("num_threads", 1, "torch intra-op threads", 1, 64),
    Param("seed", 0, "seed of sampling", 0, 2**31 - 1),
    Param("diagnostics_rate_hz", 1.0, "rate of /diagnostics messages (0 = off)", 0.0, 50.0, runtime=True),
    # Where: each episode's pose at its frame's stamp, from a pose topic or tf2.
    Param("pose_topic", "", "pose source topic (e.g. /odom, /amcl_pose); empty = none (unless pose_tf_frame)"),
    Param("pose_topic_type", "odometry", "message type of pose_topic: nav_msgs/Odometry, "
          "geometry_msgs/PoseStamped or geometry_msgs/PoseWithCovarianceStamped",
          choices=("odometry", "pose_stamped", "pose_with_covariance_stamped")),
    Param("pose_tf_frame", "", "take each episode's pose from tf2 instead: this frame (e.g. map) ← the camera "
          "frame at the frame's stamp; needs tf2_ros; empty = off"),
    Param("pose_ring_size", 512, "recent poses kept for interpolation", 2, 100000),
    Param("pose_max_gap_s", 0.5, "two poses further apart than this around a frame's stamp give it no pose "
          "(counted: pose_missing_gap)", 0.0, 60.0, runtime=True),
    Param("pose_max_extrapolate_s", 0.1, "a stamp this close past the newest pose (or before the oldest) takes "
          "that pose", 0.0, 10.0, runtime=True),
    # How long: retention, enforced as episodes arrive (0 = no limit).
    Param("retention_max_bytes", 0, "disk budget of the store's database in bytes; oldest episodes go first "
          "(0 = none)", 0, 2**62, runtime=True),
    Param("retention_max_episodes", 0, "most episodes kept (0 = no limit)", 0, 2**62, runtime=True),
    Param("retention_max_age_s", 0.0, "episodes older than this (before the newest) are deleted (0 = keep)",
          0.0, 1e10, runtime=True),
    Param("retention_thin_interval_s", 0.0, "over a limit, first keep one episode per this many seconds while "
          "the scene does not change (0 = oldest first only)", 0.0, 1e7, runtime=True),
    Param("retention_thin_min_cosine", 0.98, "embedding cosine at or above which the scene counts as unchanged "
          "for thinning", -1.0, 1.0, runtime=True),
)

BY_NAME = {p.name: p for p in PARAMS}


def check(name: str, value: Any) -> str | None:
    """Why ``value`` is not acceptable for parameter ``name``, or None when it is."""
    p = BY_NAME[name]
    if isinstance(p.default, bool):
        return None if isinstance(value, bool) else f"{name} must be a bool, got {value!r}"
    if isinstance(p.default, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{name} must be a number, got {value!r}"
        if isinstance(p.default, int) and not isinstance(value, int):
            return f"{name} must be an integer, got {value!r}"
        if (p.low is not None and value < p.low) or (p.high is not None and value > p.high):
            return f"{name} must be in [{p.low}, {p.high}], got {value!r}"
        return None
    if not isinstance(value, str):
        return f"{name} must be a string, got {value!r}"
    if p.choices and value not in p.choices:
        return f"{name} must be one of {list(p.choices)}, got {value!r}"
    return None
