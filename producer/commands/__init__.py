"""One module per group of producer commands; producer.cli registers them."""
