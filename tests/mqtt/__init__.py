"""Tests of fmi_bridge/mqtt/."""
