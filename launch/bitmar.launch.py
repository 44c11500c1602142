"""Launch the BitMar perception node: `ros2 launch bitmar_ros bitmar.launch.py`.

Arguments: config (params YAML), checkpoint, store_dir, image_topic, text_topic, namespace,
use_sim_time, log_level, lifecycle, respawn. Everything else lives in the params file
(config/bitmar.yaml, keyed `/**` so that it applies under any namespace).

The node is a managed (lifecycle) node. By default it configures and activates itself at start
(`autostart`), so this file just works; `lifecycle:=true` leaves it unconfigured for a lifecycle
manager (configure, activate, deactivate, cleanup, shutdown on `<ns>/bitmar/change_state`).
`respawn:=true` (the default) restarts it after it exits, e.g. with code 3 when its worker thread
crashes 5 times within 60 s; respawn waits RESPAWN_DELAY_S so that a crash loop cannot spin.
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration, PythonExpression
from launch_ros.actions import Node

RESPAWN_DELAY_S = 5.0  # model loading takes seconds; a node crashing at once is retried at this pace


def generate_launch_description() -> LaunchDescription:
    share = get_package_share_directory("bitmar_ros")
    args = [
        DeclareLaunchArgument("config", default_value=os.path.join(share, "config", "bitmar.yaml"),
                              description="ROS parameters file (ros__parameters)"),
        DeclareLaunchArgument("checkpoint", default_value=os.path.join(share, "checkpoints", "bitmar_default.safetensors"),
                              description="BitMar checkpoint (safetensors)"),
        DeclareLaunchArgument("store_dir", default_value=os.path.expanduser("~/.bitmar/store"),
                              description="directory of the persistent episodic store"),
        DeclareLaunchArgument("image_topic", default_value="camera/image_raw", description="sensor_msgs/Image input"),
        DeclareLaunchArgument("text_topic", default_value="captions", description="std_msgs/String input"),
        DeclareLaunchArgument("namespace", default_value="", description="node namespace"),
        DeclareLaunchArgument("store_dsn", default_value="",
                              description="PostgreSQL DSN of a fleet store (empty: SQLite at store_dir)"),
        DeclareLaunchArgument("use_sim_time", default_value="false", description="use /clock (bag replay)"),
        DeclareLaunchArgument("log_level", default_value="info", description="debug|info|warn|error"),
        DeclareLaunchArgument("lifecycle", default_value="false",
                              description="true: wait unconfigured for a lifecycle manager; false: configure "
                                          "and activate at start"),
        DeclareLaunchArgument("respawn", default_value="true",
                              description="restart the node when it exits (exit code 3: its worker crash-looped)"),
    ]
    node = Node(
        package="bitmar_ros",
        executable="bitmar_node",
        name="bitmar",
        namespace=LaunchConfiguration("namespace"),
        output="screen",
        respawn=LaunchConfiguration("respawn"),
        respawn_delay=RESPAWN_DELAY_S,
        parameters=[
            LaunchConfiguration("config"),
            {
                "checkpoint": LaunchConfiguration("checkpoint"),
                "store_dir": LaunchConfiguration("store_dir"),
                "store_dsn": LaunchConfiguration("store_dsn"),
                "use_sim_time": LaunchConfiguration("use_sim_time"),
                "autostart": PythonExpression(["'", LaunchConfiguration("lifecycle"), "'.lower() != 'true'"]),
            },
        ],
        remappings=[
            ("image", LaunchConfiguration("image_topic")),
            ("text", LaunchConfiguration("text_topic")),
        ],
        arguments=["--ros-args", "--log-level", LaunchConfiguration("log_level")],
    )
    return LaunchDescription(args + [node])
