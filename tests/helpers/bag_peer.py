"""A second OS process for tests/test_bag_tools.py: `publish N` publishes N known messages on each of
/bag_test/description (bitmar_ros/Description, unicode text), /bag_test/text (std_msgs/String) and
/bag_test/image (sensor_msgs/Image) once every topic has a subscriber, waits until all are
acknowledged, prints "done", and spins until SIGINT. The test derives the same contents itself."""
import sys

import rclpy
from rclpy.duration import Duration
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.qos import QoSProfile
from sensor_msgs.msg import Image
from std_msgs.msg import String

from bitmar_ros.msg import Description


def description(i: int) -> Description:
    msg = Description(stream_id=2**33 + i, token_index=i, token_id=-1 if i % 2 else 50000 + i,
                      text_delta=f" ünï{i}", text=f"猫 {i} — café ☕", is_final=(i % 3 == 0))
    msg.header.stamp.sec, msg.header.stamp.nanosec, msg.header.frame_id = 1_000 + i, 7 * i, f"cam_{i}"
    return msg


def image(i: int) -> Image:
    msg = Image(height=2, width=3, encoding="rgb8", is_bigendian=0, step=9)
    msg.header.frame_id = "camera"
    msg.data = bytes((i * 18 + k) % 256 for k in range(18))
    return msg


def main() -> None:
    n = int(sys.argv[2])
    rclpy.init()
    node = Node("bag_peer")
    qos = QoSProfile(depth=100)
    pubs = [node.create_publisher(Description, "/bag_test/description", qos),
            node.create_publisher(String, "/bag_test/text", qos),
            node.create_publisher(Image, "/bag_test/image", qos)]
    state = {"sent": False}

    def tick() -> None:
        # Publish only once every topic has a subscriber, so nothing is lost to discovery.
        if state["sent"] or any(p.get_subscription_count() == 0 for p in pubs):
            return
        for i in range(n):
            pubs[0].publish(description(i))
            pubs[1].publish(String(data=f"text {i} ✓"))
            pubs[2].publish(image(i))
        for p in pubs:
            p.wait_for_all_acked(Duration(seconds=10))
        state["sent"] = True
        print("done", flush=True)

    node.create_timer(0.02, tick)
    print("ready", flush=True)
    try:
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    main()
