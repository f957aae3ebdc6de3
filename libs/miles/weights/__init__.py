"""Where the policy's weights go: blob stores (directory, JetStream Object Store), following the
latest ``WeightsPublished`` event, and pushing weights into live engines."""
