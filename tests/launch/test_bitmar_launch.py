"""launch_testing test of the node (runs on a robot with ROS 2: `launch_test tests/launch/test_bitmar_launch.py`).

Starts bitmar.launch.py with a temp store, waits for the query service, stores one episode from a
published frame + caption and checks the query returns it. Not collected by pytest here (the
directory is excluded in tests/conftest.py): launch_testing is not installable from PyPI.
"""
import os
import tempfile
import time
import unittest

import launch
import launch_ros
import launch_testing.actions
import numpy as np
import pytest
import rclpy
from ament_index_python.packages import get_package_share_directory
from launch.actions import IncludeLaunchDescription
from launch.launch_description_sources import PythonLaunchDescriptionSource
from sensor_msgs.msg import Image
from std_msgs.msg import String

from bitmar_ros.msg import Episode
from bitmar_ros.srv import QueryMemory


@pytest.mark.launch_test
def generate_test_description():
    share = get_package_share_directory("bitmar_ros")
    store = tempfile.mkdtemp(prefix="bitmar-launch-test-")
    launch_file = os.path.join(share, "launch", "bitmar.launch.py")
    return launch.LaunchDescription([
        IncludeLaunchDescription(PythonLaunchDescriptionSource(launch_file),
                                 launch_arguments={"store_dir": os.path.join(store, "store"),
                                                   "image_topic": "image", "text_topic": "text"}.items()),
        launch_testing.actions.ReadyToTest(),
    ])


class TestBitMarNode(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        rclpy.init()
        cls.node = rclpy.create_node("bitmar_launch_test")

    @classmethod
    def tearDownClass(cls):
        cls.node.destroy_node()
        rclpy.shutdown()

    def test_episode_round_trip(self):
        episodes = []
        self.node.create_subscription(Episode, "episodes", episodes.append, 10)
        img_pub = self.node.create_publisher(Image, "image", 10)
        txt_pub = self.node.create_publisher(String, "text", 10)
        client = self.node.create_client(QueryMemory, "/bitmar/query_memory")
        self.assertTrue(client.wait_for_service(timeout_sec=60.0))
        end = time.monotonic() + 30
        while img_pub.get_subscription_count() == 0 and time.monotonic() < end:
            rclpy.spin_once(self.node, timeout_sec=0.1)
        rgb = np.zeros((224, 224, 3), np.uint8)
        rgb[60:160, 60:160] = (255, 0, 0)
        msg = Image(height=224, width=224, encoding="rgb8", step=224 * 3, data=rgb.tobytes())
        msg.header.stamp = self.node.get_clock().now().to_msg()
        img_pub.publish(msg)
        txt_pub.publish(String(data="a large red square in the center"))
        end = time.monotonic() + 60
        while not episodes and time.monotonic() < end:
            rclpy.spin_once(self.node, timeout_sec=0.1)
        self.assertEqual(episodes[0].caption, "a large red square in the center")
        fut = client.call_async(QueryMemory.Request(text="red square", k=1))
        rclpy.spin_until_future_complete(self.node, fut, timeout_sec=30)
        self.assertEqual(fut.result().episodes[0].id, episodes[0].id)
