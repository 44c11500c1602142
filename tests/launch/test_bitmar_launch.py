"""launch_testing test of the node (runs on a robot with ROS 2: `launch_test tests/launch/test_bitmar_launch.py`).

Starts bitmar.launch.py the way a robot does: under a namespace, with its own params file (the
package's config/bitmar.yaml with values changed) and with the camera and caption topics remapped
to names the node does not use by default, so a launch file that loses its remappings, its params
file or its namespace handling fails here. Stores one episode from a published frame + caption,
finds it with the query service, reads a parameter back from the params file, and after shutdown
checks that every process exited 0. Not collected by pytest here (tests/conftest.py excludes the
directory): launch_testing is not installable from PyPI; tests/test_launch.py checks the same
wiring statically.
"""
import os
import tempfile
import time
import unittest

import launch
import launch_testing.actions
import launch_testing.asserts
import numpy as np
import pytest
import rclpy
import yaml
from ament_index_python.packages import get_package_share_directory
from launch.actions import IncludeLaunchDescription
from launch.launch_description_sources import PythonLaunchDescriptionSource
from rcl_interfaces.srv import GetParameters
from sensor_msgs.msg import Image
from std_msgs.msg import String

from bitmar_ros.msg import Episode
from bitmar_ros.srv import QueryMemory

NAMESPACE = "robot1"
IMAGE_TOPIC = "/launch_test/cam/rgb"        # the node's own names are `image` and `text`
TEXT_TOPIC = "/launch_test/speech/utterance"
MAX_QUERY_K = 17                             # the package's file says 50


@pytest.mark.launch_test
def generate_test_description():
    share = get_package_share_directory("bitmar_ros")
    tmp = tempfile.mkdtemp(prefix="bitmar-launch-test-")
    with open(os.path.join(share, "config", "bitmar.yaml")) as f:
        doc = yaml.safe_load(f)
    (key,) = doc
    doc[key]["ros__parameters"].update(max_query_k=MAX_QUERY_K, describe_rate_hz=0.0)
    params = os.path.join(tmp, "my.yaml")
    with open(params, "w") as f:
        yaml.safe_dump(doc, f)
    launch_file = os.path.join(share, "launch", "bitmar.launch.py")
    return launch.LaunchDescription([
        IncludeLaunchDescription(PythonLaunchDescriptionSource(launch_file), launch_arguments={
            "store_dir": os.path.join(tmp, "store"), "config": params, "namespace": NAMESPACE,
            "image_topic": IMAGE_TOPIC, "text_topic": TEXT_TOPIC, "respawn": "false"}.items()),
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

    def _call(self, client, request):
        self.assertTrue(client.wait_for_service(timeout_sec=60.0), client.srv_name)
        fut = client.call_async(request)
        rclpy.spin_until_future_complete(self.node, fut, timeout_sec=30)
        return fut.result()

    def test_params_file_applies_under_the_namespace(self):
        client = self.node.create_client(GetParameters, f"/{NAMESPACE}/bitmar/get_parameters")
        resp = self._call(client, GetParameters.Request(names=["max_query_k"]))
        self.assertEqual(resp.values[0].integer_value, MAX_QUERY_K)

    def test_episode_round_trip_over_the_remapped_topics(self):
        episodes = []
        self.node.create_subscription(Episode, f"/{NAMESPACE}/episodes", episodes.append, 10)
        img_pub = self.node.create_publisher(Image, IMAGE_TOPIC, 10)
        txt_pub = self.node.create_publisher(String, TEXT_TOPIC, 10)
        client = self.node.create_client(QueryMemory, f"/{NAMESPACE}/bitmar/query_memory")
        self.assertTrue(client.wait_for_service(timeout_sec=60.0))
        end = time.monotonic() + 30
        while (img_pub.get_subscription_count() == 0 or txt_pub.get_subscription_count() == 0) and time.monotonic() < end:
            rclpy.spin_once(self.node, timeout_sec=0.1)
        self.assertGreater(img_pub.get_subscription_count(), 0, f"nothing subscribes to {IMAGE_TOPIC}")
        self.assertGreater(txt_pub.get_subscription_count(), 0, f"nothing subscribes to {TEXT_TOPIC}")
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
        resp = self._call(client, QueryMemory.Request(text="red square", k=1))
        self.assertEqual(resp.episodes[0].id, episodes[0].id)


@launch_testing.post_shutdown_test()
class TestBitMarShutdown(unittest.TestCase):
    def test_exit_codes(self, proc_info):
        """The node saved its memory and exited 0 on launch's SIGINT (not -2, not killed)."""
        launch_testing.asserts.assertExitCodes(proc_info, allowable_exit_codes=[0])
