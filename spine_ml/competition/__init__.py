"""The competition: vocabulary, CSV readers, metric and submission format."""
