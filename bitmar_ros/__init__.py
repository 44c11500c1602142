"""BitMar ROS 2 node: a thin adapter from ROS messages to bitmar_core and back.

The generated interfaces (``bitmar_ros.msg``, ``bitmar_ros.srv``) are installed by the package build
next to these modules. When this source tree is imported in front of an installed copy (development,
tests), ``extend_path`` lets the generated modules still resolve from the installed one.
"""
from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)
