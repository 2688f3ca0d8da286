"""Data pipeline: tokenizer, indexed datasets, the embedded default corpus, GPT datasets.

    documents.py   how text and JSONL files split into documents
    tokenizer.py   load_tokenizer (SentencePiece or Hugging Face tokenizer.json), train_tokenizer
    indexed.py     write_indexed_dataset, preprocess_files (megatron-core .bin/.idx)
    corpus.py      ensure_embedded_corpus: stdlib docstrings -> tokenizer + indexed dataset, cached
    datasets.py    build_gpt_datasets: train/validation via megatron-core's GPT dataset builder
    sampler.py     PretrainingSampler, build_data_loader: the resumable data position
    locking.py     build-once helpers shared by the caches

Nothing is re-exported here: importing megatron-core takes seconds, and the tokenizer (and
``tools/train_tokenizer.py``) should not pay for it.
"""
