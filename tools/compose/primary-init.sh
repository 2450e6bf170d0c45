#!/bin/bash
# Lets the replica stream from the primary (docker-compose.yml's pg-replica service).
set -e
echo "host replication all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
