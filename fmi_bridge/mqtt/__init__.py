"""The broker side: the MQTT link (the one owner of the session and its acknowledgements), the PUBLISH decoder
that keeps a message whose properties paho cannot parse, and the bounded inbox between the link and intake."""
