"""What the test modules share: paths and the subprocess environment (common), brute-force references
(bruteforce), running R gloo ranks (dist)."""
