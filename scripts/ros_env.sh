# Sourced by the project's scripts: the environment every process that starts rclpy runs in.
# Discovery stays on this machine (Kilted ignores ROS_LOCALHOST_ONLY), each run gets its own DDS
# domain, and ROS logs go to a temp dir instead of ~/.ros.
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
export ROS_DOMAIN_ID="${ROS_DOMAIN_ID:-$(( ($$ % 100) + 1 ))}"
export ROS_HOME="${ROS_HOME:-$(mktemp -d -t bitmar-ros-XXXXXX)}"
export ROS_LOG_DIR="${ROS_LOG_DIR:-$ROS_HOME/log}"
export RMW_IMPLEMENTATION="${RMW_IMPLEMENTATION:-rmw_fastrtps_cpp}"
_bitmar_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export AMENT_PREFIX_PATH="$_bitmar_root/.venv${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}"
export PATH="$_bitmar_root/.venv/bin:$_bitmar_root/.venv/lib/bitmar_ros:$PATH"
