"""bytewax connectors of the dataflow: MQTT (mesh in, dead letters out), InfluxDB, Parquet."""
