"""The sinks: the contract every sink keeps (`contract`), the sender that drives one lane of a sink from the
spool (`sender`), Pub/Sub (`pubsub`, with Google's Publish limits in `pubsub_limits`), BigQuery by streaming
inserts (`bigquery_insert_all`) and by the Storage Write API (`bigquery_write`, its AppendRows connection and
what each refusal means)."""
