"""Tests of fmi_bridge/container/."""
