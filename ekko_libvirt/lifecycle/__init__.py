"""What keeps a store healthy over time: retention (prune), gc, verify."""
