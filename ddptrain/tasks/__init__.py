"""Built-in tasks on datasets that ship with scikit-learn (no download): digits and diabetes."""
