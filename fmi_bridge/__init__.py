"""fmi-mqtt-bridge: the core every part shares sits at the top (configuration, readings and events, the spool,
intake, metrics, health, logs, loops, shutdown, stats, cloud clients, the partition window, and `assembly`, which
builds the parts from a configuration); the families sit in folders: `mqtt/`, `sinks/`, `container/`,
`commands/`."""

from pathlib import Path

APP_DIR = Path(__file__).resolve().parent.parent  # the checkout or the image's /app: schemas/ and the .conf files
