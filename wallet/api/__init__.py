"""The node's HTTP API: app (wallet holders), institution and operator surfaces."""
