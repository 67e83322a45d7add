"""Operator tools and integrations the front doors share: status, pending counts, the
parking lot, destroy, export and transfer, logs, and the webhook, forward and bridge
handlers."""
