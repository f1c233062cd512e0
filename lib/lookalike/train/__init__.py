"""The train stage: a head tuned on the catalog's labels and shoppers' behaviour, and the text map."""
