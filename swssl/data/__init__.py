"""Reading images and datasets: file formats (strict, streamable), the dataset layouts, the demo data."""
