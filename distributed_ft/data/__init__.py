"""Reading labelled data files."""
