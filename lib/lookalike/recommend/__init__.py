"""The recommend stage: shoppers' histories -> tastes -> recommendations."""
