"""Model output as OpenAI text: incremental detokenization and stop strings, reasoning split, tool-call parsing."""
