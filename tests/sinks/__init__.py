"""Tests of fmi_bridge/sinks/."""
