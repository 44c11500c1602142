"""A second OS process for tests/test_interfaces.py: publishes Description messages or serves
QueryMemory with answers the test can predict from its request."""
import sys

import rclpy
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node

from bitmar_ros.msg import Description, Episode
from bitmar_ros.srv import QueryMemory


def serve(node: Node) -> None:
    def on_query(req: QueryMemory.Request, resp: QueryMemory.Response) -> QueryMemory.Response:
        # Episode i gets id 1000+i and a caption that echoes the query, so the caller can check both.
        for i in range(req.k):
            ep = Episode(id=1000 + i, caption=f"{req.text}#{i}", source="caption", score=1.0 - 0.25 * i)
            ep.stamp.sec = req.start.sec + i
            ep.thumbnail.format = "jpeg"
            ep.thumbnail.data = bytes([i, 255 - i, 7])
            resp.episodes.append(ep)
        resp.success = True
        resp.message = f"{len(req.image.data)} image bytes"
        return resp

    node.create_service(QueryMemory, "query_memory", on_query)
    print("ready", flush=True)


def publish(node: Node, count: int) -> None:
    pub = node.create_publisher(Description, "description_stream", 10)
    state = {"i": 0}

    def tick() -> None:
        # Publish only once someone listens, so no message is lost to discovery timing.
        if pub.get_subscription_count() == 0 or state["i"] >= count:
            return
        i = state["i"]
        pub.publish(Description(stream_id=7, token_index=i, token_id=100 + i, text_delta=f"w{i} ",
                                text="".join(f"w{j} " for j in range(i + 1)), is_final=(i == count - 1)))
        state["i"] += 1

    node.create_timer(0.01, tick)
    print("ready", flush=True)


def main() -> None:
    rclpy.init()
    node = Node("interface_peer")
    if sys.argv[1] == "serve":
        serve(node)
    else:
        publish(node, int(sys.argv[2]))
    try:
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    main()
