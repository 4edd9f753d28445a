"""Tests of fmi_bridge/commands/."""
