"""The container: the launcher that renders the broker's configuration, fetches secrets and runs supervisord,
and the event listener that stops the container when a program cannot be kept running."""
