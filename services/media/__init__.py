"""Files between WeCom and Dify: media a user sends (downloaded, decrypted, uploaded to Dify) and images Dify
answers with (fitted to WeCom's inline limit)."""
