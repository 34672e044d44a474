"""`make bench`: throughput, round trips, claim latency, sustained drain, idle tick,
cold start and cost of the queue, against a raw-SQL baseline and two peer libraries."""
